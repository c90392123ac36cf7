#!/usr/bin/env bash
# Writes crates/laplace-cli/fonts/DejaVuSans-subset.ttf, the font compiled
# into `laplace` for the demo's figures: DejaVu Sans 2.37 from Debian's
# fonts-dejavu-core, cut to the characters the figures use (ASCII,
# Latin-1, Greek, arrows and a few math signs) without hinting
# (ab_glyph ignores it): 27 KB instead of 760 KB.
#
# Needs: apt-get install fonts-dejavu-core; pip install fonttools.
set -euo pipefail
cd "$(dirname "$0")/../.."
pyftsubset /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
    --unicodes="U+0020-007E,U+00A0-00FF,U+0391-03A9,U+03B1-03C9,U+2013,U+2014,U+2018,U+2019,U+201C,U+201D,U+2026,U+2190-2193,U+2212,U+2248,U+2260,U+2264,U+2265,U+221A,U+2211,U+00B7" \
    --layout-features='kern' --no-hinting --desubroutinize \
    --output-file=crates/laplace-cli/fonts/DejaVuSans-subset.ttf
