//! The README's Rust code is the examples' code: each ```rust block of the
//! Library section, after its `use` lines, is the region between
//! `// README: begin NAME` and `// README: end NAME` of an example, dedented.

use std::path::Path;

fn region(example: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(example);
    let s = std::fs::read_to_string(&path).expect("example exists");
    let begin = format!("// README: begin {name}\n");
    let a = s.find(&begin).unwrap_or_else(|| panic!("{}: no {begin:?}", path.display())) + begin.len();
    let b = s[a..].find(&format!("// README: end {name}")).expect("end marker") + a;
    let body = &s[a..b];
    body.lines().map(|l| l.strip_prefix("    ").unwrap_or(l).trim_end()).collect::<Vec<_>>().join("\n").trim_end().to_string()
}

fn readme_rust_blocks() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let s = std::fs::read_to_string(path).expect("README.md");
    let lib = &s[s.find("## Library").expect("Library section")..];
    let lib = &lib[..lib[3..].find("\n## ").map_or(lib.len(), |i| i + 3)];
    lib.split("```rust\n").skip(1).map(|b| b[..b.find("```").expect("closed block")].to_string()).collect()
}

#[test]
fn readme_library_blocks_are_the_examples_verbatim() {
    let blocks = readme_rust_blocks();
    assert_eq!(blocks.len(), 2, "the Library section has two Rust blocks");
    for (block, (example, name)) in blocks.iter().zip([("curvature.rs", "curvature"), ("posterior.rs", "posterior")]) {
        let code: Vec<&str> = block.lines().skip_while(|l| l.starts_with("use ") || l.is_empty()).collect();
        assert_eq!(code.join("\n").trim_end(), region(example, name), "README block vs examples/{example}");
        for u in block.lines().filter(|l| l.starts_with("use ")) {
            let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(example)).unwrap();
            assert!(src.contains(u), "README's {u:?} is not in examples/{example}");
        }
    }
}
