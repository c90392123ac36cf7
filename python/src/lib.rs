//! `laplace_rs._native`: the numpy API of laplace-rs.
//!
//! A thin layer: numpy arrays in, numpy arrays out, every computation in the
//! `laplace` crate with the GIL released. Errors become `laplace_rs.Error`
//! (a `ValueError`) with the library's message. The Python package
//! (`laplace_rs/__init__.py`) documents the functions with shapes.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;

use laplace::curvature::KfacApprox;
use laplace::posterior::marglik::MarglikOptions;
use laplace::posterior::predict::Link;
use laplace::pass::{fold_batches, Monitor};
use laplace::posterior::{FitOptions, Posterior, Structure};
use laplace::tensor::{self, DType, Device, Tensor};
use laplace::{BatchSize, Curvature, CurvatureKind, Dataset, Inputs, Likelihood, Model, ModelSpec, Subset};
use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

create_exception!(laplace_rs, Error, PyValueError, "An error of laplace-rs: bad input, a model it cannot build, a non-finite result.");

fn err(e: laplace::Error) -> PyErr {
    Error::new_err(e.to_string())
}

/// Watches passes over data from the computing thread (which released the
/// GIL): between batches it takes the GIL to let Python handle pending
/// signals (Ctrl-C raises `KeyboardInterrupt` there, which stops the pass) and
/// to call the optional `progress(what, done, total)` callback.
struct PyMonitor {
    callback: Option<Py<PyAny>>,
    /// The pass being run: its name and number of batches.
    pass: Mutex<(String, usize)>,
    /// The Python exception that stopped the computation.
    error: Mutex<Option<PyErr>>,
}

impl PyMonitor {
    fn call(&self, done: usize) -> ControlFlow<()> {
        Python::with_gil(|py| {
            let r = py.check_signals().and_then(|()| match &self.callback {
                Some(cb) => {
                    let (what, total) = self.pass.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    cb.call1(py, (what, done, total)).map(drop)
                }
                None => Ok(()),
            });
            match r {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
    }
}

impl Monitor for PyMonitor {
    fn begin(&self, what: &str, batches: usize) {
        *self.pass.lock().unwrap_or_else(|e| e.into_inner()) = (what.to_string(), batches);
        if self.callback.is_some() {
            // A failing callback is reported at the first batch's check.
            let _ = self.call(0);
        }
    }

    fn progress(&self, done: usize) -> ControlFlow<()> {
        if self.error.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return ControlFlow::Break(());
        }
        self.call(done)
    }
}

/// Run `f` with the GIL released, watched by a [`PyMonitor`]: a Python
/// exception raised between batches (KeyboardInterrupt, or one from the
/// callback) is re-raised as itself, every other error as `laplace_rs.Error`.
fn monitored<T: Send>(py: Python<'_>, progress: Option<&Bound<'_, PyAny>>, f: impl FnOnce(&dyn Monitor) -> laplace::Result<T> + Send) -> PyResult<T> {
    let mon = PyMonitor {
        callback: progress.filter(|p| !p.is_none()).map(|p| p.clone().unbind()),
        pass: Mutex::new((String::new(), 0)),
        error: Mutex::new(None),
    };
    let r = py.allow_threads(|| f(&mon));
    match r {
        Ok(v) => Ok(v),
        Err(e) => Err(mon.error.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| err(e))),
    }
}

fn dtype_arg(d: Option<&str>) -> PyResult<Option<DType>> {
    match d {
        None => Ok(None),
        Some("float32") | Some("f32") => Ok(Some(DType::F32)),
        Some("float64") | Some("f64") => Ok(Some(DType::F64)),
        Some(other) => Err(Error::new_err(format!("dtype must be \"float32\" or \"float64\", got {other:?}"))),
    }
}

/// A numpy array (float32 / float64 / int64 / int32 / bool) as a tensor, copied.
fn to_tensor(a: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    let dev = Device::Cpu;
    macro_rules! try_as {
        ($t:ty, $conv:expr) => {
            if let Ok(arr) = a.extract::<PyReadonlyArrayDyn<$t>>() {
                let shape = arr.shape().to_vec();
                let data: Vec<_> = arr.as_array().iter().map($conv).collect();
                return Tensor::from_vec(data, shape, &dev).map_err(|e| err(e.into()));
            }
        };
    }
    try_as!(f64, |v: &f64| *v);
    try_as!(f32, |v: &f32| *v);
    try_as!(i64, |v: &i64| *v);
    try_as!(i32, |v: &i32| *v as i64);
    try_as!(bool, |v: &bool| *v as i64);
    Err(Error::new_err(format!("{what} must be a numpy array of float32, float64, int64, int32 or bool")))
}

fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.dims().to_vec();
    if t.dtype() == DType::F32 {
        let v = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| err(e.into()))?;
        Ok(v.into_pyarray(py).reshape(shape)?.into_any())
    } else {
        let v = tensor::to_vec_f64(t).map_err(err)?;
        Ok(v.into_pyarray(py).reshape(shape)?.into_any())
    }
}

/// Inputs: one array, or a dict of named arrays (input_ids, attention_mask, ...).
fn to_inputs(x: &Bound<'_, PyAny>, dtype: DType) -> PyResult<Inputs> {
    let inputs = if let Ok(d) = x.downcast::<PyDict>() {
        let mut entries = Vec::new();
        for (k, v) in d.iter() {
            let name: String = k.extract()?;
            entries.push((name.clone(), to_tensor(&v, &name)?));
        }
        Inputs::named(entries).map_err(err)?
    } else {
        Inputs::from(to_tensor(x, "x")?)
    };
    inputs.to_dtype(dtype).map_err(err)
}

/// The subset argument: None / "all", "last_layer", an index array, or a list of name globs.
fn to_subset(model: &Model, s: Option<&Bound<'_, PyAny>>) -> PyResult<Subset> {
    let Some(s) = s else { return Ok(Subset::All) };
    if s.is_none() {
        return Ok(Subset::All);
    }
    if let Ok(name) = s.extract::<String>() {
        return match name.as_str() {
            "all" => Ok(Subset::All),
            "last_layer" => Ok(Subset::LastLayer),
            other => Err(Error::new_err(format!("subset must be \"all\", \"last_layer\", an index array or a list of name globs, got {other:?}"))),
        };
    }
    if let Ok(list) = s.downcast::<PyList>() {
        if list.iter().all(|v| v.extract::<String>().is_ok()) && !list.is_empty() {
            let globs: Vec<String> = list.extract()?;
            let refs: Vec<&str> = globs.iter().map(String::as_str).collect();
            return Ok(Subset::Subnetwork(model.param_indices_matching(&refs).map_err(err)?));
        }
    }
    let idx: Vec<i64> = match s.extract::<PyReadonlyArrayDyn<i64>>() {
        Ok(a) => a.as_array().iter().copied().collect(),
        Err(_) => s.extract::<Vec<i64>>().map_err(|_| Error::new_err("subset indices must be integers"))?,
    };
    Ok(Subset::Subnetwork(idx))
}

fn kind_arg(curvature: &str, samples: usize, seed: u64) -> PyResult<CurvatureKind> {
    Ok(match curvature {
        "ggn" => CurvatureKind::Ggn,
        "ef" => CurvatureKind::Ef,
        "hessian" => CurvatureKind::Hessian,
        "fisher-mc" | "fisher_mc" | "mc" => CurvatureKind::FisherMc { samples, seed },
        other => return Err(Error::new_err(format!("curvature must be ggn, fisher-mc, ef or hessian, got {other:?}"))),
    })
}

fn likelihood_arg(l: &str) -> PyResult<Likelihood> {
    l.parse().map_err(err)
}

/// A model: the graph (or Sequential) spec with its weights, in a compute dtype.
#[pyclass(name = "Model", module = "laplace_rs._native")]
struct PyModel {
    inner: Model,
}

#[pymethods]
impl PyModel {
    /// Load `model.json` and `weights.safetensors` (dtype: "float32" / "float64"; default: the weights').
    #[staticmethod]
    #[pyo3(signature = (model_json, weights, dtype=None))]
    fn load(model_json: &str, weights: &str, dtype: Option<&str>) -> PyResult<Self> {
        let inner = Model::load(Path::new(model_json), Path::new(weights), dtype_arg(dtype)?, &Device::Cpu).map_err(err)?;
        Ok(PyModel { inner })
    }

    /// Export a PyTorch module with laplace-rs's exporter and load it
    /// (needs torch; see `laplace_rs.exporter.to_model`).
    #[staticmethod]
    #[pyo3(signature = (module, example_input, dtype=None, output_key=None))]
    fn from_torch(py: Python<'_>, module: &Bound<'_, PyAny>, example_input: &Bound<'_, PyAny>, dtype: Option<&str>, output_key: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let m = py.import("laplace_rs.exporter")?.call_method1("to_model", (module, example_input, dtype, output_key))?;
        let m = m.downcast::<PyModel>()?.borrow();
        Ok(PyModel { inner: m.inner.try_clone().map_err(err)? })
    }

    /// Build from the JSON text of a spec and a dict of state-dict arrays.
    #[staticmethod]
    #[pyo3(signature = (spec_json, weights, dtype=None))]
    fn from_spec(spec_json: &str, weights: &Bound<'_, PyDict>, dtype: Option<&str>) -> PyResult<Self> {
        let spec = ModelSpec::from_json(spec_json).map_err(err)?;
        let mut w = HashMap::new();
        for (k, v) in weights.iter() {
            let name: String = k.extract()?;
            let t = to_tensor(&v, &name)?;
            w.insert(name, t);
        }
        let inner = Model::new(spec, w, dtype_arg(dtype)?, &Device::Cpu).map_err(err)?;
        Ok(PyModel { inner })
    }

    #[getter]
    fn n_params(&self) -> usize {
        self.inner.n_params()
    }

    #[getter]
    fn n_outputs(&self) -> usize {
        self.inner.n_outputs()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        if self.inner.dtype() == DType::F32 {
            "float32"
        } else {
            "float64"
        }
    }

    /// θ's tensor names, in θ order.
    #[getter]
    fn parameter_names(&self) -> Vec<String> {
        self.inner.params().iter().map(|p| p.name.clone()).collect()
    }

    /// The graph inputs' names.
    #[getter]
    fn input_names(&self) -> Vec<String> {
        self.inner.spec().inputs.iter().map(|i| i.name.clone()).collect()
    }

    /// θ `(P,)`.
    fn parameter_vector<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_numpy(py, &self.inner.parameter_vector().map_err(err)?)
    }

    /// Replace θ `(P,)` (buffers and frozen tensors unchanged), as after an optimizer step.
    fn set_parameter_vector(&mut self, theta: &Bound<'_, PyAny>) -> PyResult<()> {
        let t = to_tensor(theta, "theta")?.to_dtype(self.inner.dtype()).map_err(|e| err(e.into()))?;
        self.inner = self.inner.with_parameter_vector(&t).map_err(err)?;
        Ok(())
    }

    /// The θ indices of the tensors whose names match the globs.
    fn param_indices<'py>(&self, py: Python<'py>, globs: Vec<String>) -> PyResult<Bound<'py, PyAny>> {
        let refs: Vec<&str> = globs.iter().map(String::as_str).collect();
        let idx = self.inner.param_indices_matching(&refs).map_err(err)?;
        Ok(idx.into_pyarray(py).into_any())
    }

    /// The θ indices of the last layer's parameters (what subset="last_layer" selects).
    fn last_layer_indices<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let idx = self.inner.last_layer_indices().map_err(err)?;
        Ok(idx.into_pyarray(py).into_any())
    }

    /// f(x) `(N, C)`.
    fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let x = to_inputs(x, self.inner.dtype())?;
        let f = py.allow_threads(|| self.inner.forward(&x)).map_err(err)?;
        to_numpy(py, &f)
    }
}

fn dataset(model: &Model, x: &Bound<'_, PyAny>, y: Option<&Bound<'_, PyAny>>) -> PyResult<Dataset> {
    let x = to_inputs(x, model.dtype())?;
    let y = y.filter(|y| !y.is_none()).map(|y| to_tensor(y, "y")).transpose()?;
    Ok(Dataset { x, y })
}

/// Curvature over a data set: (loss, H) — H `(P, P)` for "full", `(P,)` for
/// "diag"; for "kron", (loss, blocks) with blocks a list of lists of factors.
#[pyfunction]
#[pyo3(signature = (model, x, y, likelihood, curvature="ggn", structure="diag", subset=None, n_data=None, kfac_approx="expand", samples=1, seed=0, batch_size=256, progress=None))]
#[allow(clippy::too_many_arguments)]
fn curvature<'py>(
    py: Python<'py>,
    model: &PyModel,
    x: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    likelihood: &str,
    curvature: &str,
    structure: &str,
    subset: Option<&Bound<'py, PyAny>>,
    n_data: Option<usize>,
    kfac_approx: &str,
    samples: usize,
    seed: u64,
    batch_size: usize,
    progress: Option<&Bound<'py, PyAny>>,
) -> PyResult<(f64, Bound<'py, PyAny>)> {
    let m = &model.inner;
    let data = dataset(m, x, Some(y))?;
    let subset = to_subset(m, subset)?;
    let kind = kind_arg(curvature, samples, seed)?;
    let lik = likelihood_arg(likelihood)?;
    let c = Curvature::new(m, lik, kind, &subset).map_err(err)?;
    let bs = batch_size.max(1);
    match structure {
        "full" | "diag" => {
            let (loss, h) = monitored(py, progress, |mon| {
                let c = c.with_monitor(mon);
                if structure == "full" { c.full_over(&data, bs) } else { c.diag_over(&data, bs) }
            })?;
            Ok((tensor::scalar_f64(&loss).map_err(err)?, to_numpy(py, &h)?))
        }
        "kron" => {
            let approx: KfacApprox = kfac_approx.parse().map_err(err)?;
            let n = n_data.unwrap_or(data.len());
            let (loss, k) = monitored(py, progress, |mon| c.with_monitor(mon).kron_over(&data, bs, n, approx))?;
            let blocks = PyList::empty(py);
            for b in &k.blocks {
                let fs = PyList::empty(py);
                for f in b {
                    fs.append(to_numpy(py, f)?)?;
                }
                blocks.append(fs)?;
            }
            Ok((tensor::scalar_f64(&loss).map_err(err)?, blocks.into_any()))
        }
        other => Err(Error::new_err(format!("structure must be full, diag or kron, got {other:?}"))),
    }
}

/// Jacobians J `(N, C, P)` and outputs f `(N, C)`.
#[pyfunction]
#[pyo3(signature = (model, x, subset=None, batch_size=256, progress=None))]
fn jacobians<'py>(py: Python<'py>, model: &PyModel, x: &Bound<'py, PyAny>, subset: Option<&Bound<'py, PyAny>>, batch_size: usize, progress: Option<&Bound<'py, PyAny>>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let m = &model.inner;
    let data = dataset(m, x, None)?;
    let subset = to_subset(m, subset)?;
    let last = subset == Subset::LastLayer;
    let c = Curvature::new(m, Likelihood::Classification, CurvatureKind::Ggn, &subset).map_err(err)?;
    let (j, f) = monitored(py, progress, |mon| c.with_monitor(mon).jacobians_over(&data, batch_size.max(1), last))?;
    Ok((to_numpy(py, &j)?, to_numpy(py, &f)?))
}

/// Per-sample gradients G `(N, P)` of ℓ_n and the loss Σ_n ℓ_n.
#[pyfunction]
#[pyo3(signature = (model, x, y, likelihood, subset=None, batch_size=256, progress=None))]
#[allow(clippy::too_many_arguments)]
fn gradients<'py>(py: Python<'py>, model: &PyModel, x: &Bound<'py, PyAny>, y: &Bound<'py, PyAny>, likelihood: &str, subset: Option<&Bound<'py, PyAny>>, batch_size: usize, progress: Option<&Bound<'py, PyAny>>) -> PyResult<(Bound<'py, PyAny>, f64)> {
    let m = &model.inner;
    let data = dataset(m, x, Some(y))?;
    let subset = to_subset(m, subset)?;
    let c = Curvature::new(m, likelihood_arg(likelihood)?, CurvatureKind::Ef, &subset).map_err(err)?;
    let (g, loss) = monitored(py, progress, |mon| c.with_monitor(mon).gradients_over(&data, batch_size.max(1)))?;
    Ok((to_numpy(py, &g)?, tensor::scalar_f64(&loss).map_err(err)?))
}

/// A fitted Laplace posterior (the CLI's `fit` / `predict`).
#[pyclass(name = "Posterior", module = "laplace_rs._native")]
struct PyPosterior {
    inner: Posterior,
}

#[pymethods]
impl PyPosterior {
    /// A posterior file written by `save` or `laplace fit`.
    #[staticmethod]
    fn load(path: &str) -> PyResult<Self> {
        Ok(PyPosterior { inner: Posterior::load(Path::new(path)).map_err(err)? })
    }

    fn save(&self, path: &str) -> PyResult<()> {
        self.inner.save(Path::new(path)).map_err(err)
    }

    /// log p(D | prior precision, σ) at the current hyperparameters.
    fn log_marginal_likelihood(&self) -> PyResult<f64> {
        self.inner.evidence().map_err(err)
    }

    #[getter]
    fn prior_precision(&self) -> Vec<f64> {
        self.inner.prior_precision.clone()
    }

    #[getter]
    fn sigma_noise(&self) -> f64 {
        self.inner.sigma_noise
    }

    #[getter]
    fn n_params(&self) -> usize {
        self.inner.n_params()
    }

    /// GLM predictive: class probabilities (N, C) (`link`: probit, bridge,
    /// bridge_norm, mc), or for regression the mean and the functional
    /// variance (N, C) each.
    #[pyo3(signature = (x, link="probit", samples=100, seed=0, batch_size=256, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn predict<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>, link: &str, samples: usize, seed: u64, batch_size: usize, progress: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let x = to_inputs(x, self.inner.model().dtype())?;
        let link = match link {
            "probit" => Link::Probit,
            "bridge" => Link::Bridge,
            "bridge_norm" => Link::BridgeNorm,
            "mc" => Link::Mc { samples, seed },
            other => return Err(Error::new_err(format!("link must be probit, bridge, bridge_norm or mc, got {other:?}"))),
        };
        let data = Dataset { x, y: None };
        let post = &self.inner;
        let parts = monitored(py, progress, |mon| {
            fold_batches(&data, batch_size, mon, "predictive", Vec::new(), |mut parts, o, n| {
                let xb = data.inputs(o, n)?;
                parts.push(match post.likelihood {
                    Likelihood::Classification => (post.predict_probs(&xb, link)?, None),
                    Likelihood::Regression => {
                        let (m, v) = post.predict_regression(&xb)?;
                        (m, Some(v))
                    }
                });
                Ok(parts)
            })
        })?;
        let first: Vec<Tensor> = parts.iter().map(|p| p.0.clone()).collect();
        let first = Tensor::cat(&first, 0).map_err(|e| err(e.into()))?;
        if post.likelihood == Likelihood::Classification {
            return to_numpy(py, &first);
        }
        let second: Vec<Tensor> = parts.into_iter().map(|p| p.1.expect("regression has a variance")).collect();
        let second = Tensor::cat(&second, 0).map_err(|e| err(e.into()))?;
        Ok((to_numpy(py, &first)?, to_numpy(py, &second)?).into_pyobject(py)?.into_any())
    }
}

/// Fit a Laplace posterior: `structure` full / diag / kron / lowrank (`rank`),
/// `curvature` ggn / ef / fisher-mc, prior precision (scalar start), and
/// with `optimize_prior="marglik"` the prior (and with `optimize_sigma`, σ)
/// tuned by the evidence as laplace-torch does.
#[pyfunction]
#[pyo3(signature = (model, x, y, likelihood, structure="kron", subset=None, curvature="ggn", rank=10, prior_precision=1.0, optimize_prior=None, optimize_sigma=false, sigma_noise=1.0, temperature=1.0, batch_size=256, progress=None))]
#[allow(clippy::too_many_arguments)]
fn fit(
    py: Python<'_>,
    model: &PyModel,
    x: &Bound<'_, PyAny>,
    y: &Bound<'_, PyAny>,
    likelihood: &str,
    structure: &str,
    subset: Option<&Bound<'_, PyAny>>,
    curvature: &str,
    rank: usize,
    prior_precision: f64,
    optimize_prior: Option<&str>,
    optimize_sigma: bool,
    sigma_noise: f64,
    temperature: f64,
    batch_size: usize,
    progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyPosterior> {
    let m = model.inner.try_clone().map_err(err)?;
    let data = dataset(&m, x, Some(y))?;
    let subset = to_subset(&m, subset)?;
    let structure = match structure.parse::<Structure>().map_err(err)? {
        Structure::LowRank { .. } => Structure::LowRank { rank },
        s => s,
    };
    let curvature = match kind_arg(curvature, 1, 0)? {
        CurvatureKind::Hessian => return Err(Error::new_err("a posterior needs ggn, ef or fisher-mc")),
        k => k,
    };
    let lik = likelihood_arg(likelihood)?;
    let opts = FitOptions { subset, structure, curvature, batch_size: BatchSize::Points(batch_size.max(1)), prior_precision: vec![prior_precision], sigma_noise, temperature, ..FitOptions::default() };
    let marglik = match optimize_prior {
        None => false,
        Some("marglik") => true,
        Some(other) => return Err(Error::new_err(format!("optimize_prior must be None or \"marglik\", got {other:?}"))),
    };
    let post = monitored(py, progress, |mon| {
        let mut post = Posterior::fit_monitored(m, &data, lik, &opts, mon)?;
        if marglik {
            let mo = MarglikOptions { optimize_sigma, init_prior_precision: prior_precision, ..MarglikOptions::default() };
            post.optimize_marglik(&mo)?;
        }
        Ok(post)
    })?;
    Ok(PyPosterior { inner: post })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPosterior>()?;
    m.add_function(wrap_pyfunction!(fit, m)?)?;
    m.add("Error", m.py().get_type::<Error>())?;
    m.add_class::<PyModel>()?;
    m.add_function(wrap_pyfunction!(curvature, m)?)?;
    m.add_function(wrap_pyfunction!(jacobians, m)?)?;
    m.add_function(wrap_pyfunction!(gradients, m)?)?;
    Ok(())
}
