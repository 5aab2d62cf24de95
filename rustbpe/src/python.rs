//! The Python module `nanochat_rustbpe`.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::{
    compile_pattern, merges_for_vocab_size, token_bytes, train, BpeError, ChunkCounter, Encoder,
    DEFAULT_PATTERN, GPT4_PATTERN,
};

fn to_py_err(e: BpeError) -> PyErr {
    match e {
        BpeError::Failed(msg) => PyRuntimeError::new_err(msg),
        other => PyValueError::new_err(other.to_string()),
    }
}

/// A byte-level BPE tokenizer: train it on an iterator of strings, export its merges
/// (`get_mergeable_ranks` builds a tiktoken Encoding), encode text.
#[pyclass(module = "nanochat_rustbpe")]
pub struct Tokenizer {
    pattern: String,
    merges: Vec<(u32, u32)>,
    encoder: Encoder,
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer: no merges, the default split pattern.
    #[new]
    fn new() -> PyResult<Self> {
        let encoder = Encoder::new(DEFAULT_PATTERN, &[]).map_err(PyRuntimeError::new_err)?;
        Ok(Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            merges: Vec::new(),
            encoder,
        })
    }

    /// Learn `vocab_size - 256` merges from the strings of `iterator`.
    ///
    /// Strings are pulled `buffer_size` at a time with the GIL held; splitting and counting each
    /// batch run on all rayon threads with the GIL released. `pattern` defaults to
    /// `DEFAULT_PATTERN`. Training stops early when no pair is left to merge.
    #[pyo3(signature = (iterator, vocab_size, buffer_size = 8192, pattern = None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i128,
        buffer_size: i128,
        pattern: Option<String>,
    ) -> PyResult<()> {
        let n_merges = merges_for_vocab_size(vocab_size).map_err(to_py_err)?;
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!(
                "buffer_size must be a positive number of strings, got {buffer_size}"
            )));
        }
        let buffer_size = buffer_size.min(usize::MAX as i128) as usize;
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = compile_pattern(&pattern).map_err(to_py_err)?;
        let mut iter = iterator.try_iter().map_err(|e| {
            if !e.is_instance_of::<PyTypeError>(py) {
                return e; // __iter__ itself failed: let its error through
            }
            PyTypeError::new_err(format!(
                "train_from_iterator needs an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;

        let mut counter = ChunkCounter::new(splitter);
        let mut position: u64 = 0;
        let mut batch: Vec<Bound<'_, PyString>> = Vec::with_capacity(buffer_size.min(1 << 16));
        loop {
            batch.clear();
            for item in iter.by_ref().take(buffer_size) {
                let item = item?;
                match item.cast_into::<PyString>() {
                    Ok(s) => batch.push(s),
                    Err(e) => {
                        return Err(PyTypeError::new_err(format!(
                            "train_from_iterator expects str items, but item {position} of the iterator is {}",
                            type_name(&e.into_inner())
                        )));
                    }
                }
                position += 1;
            }
            if batch.is_empty() {
                break;
            }
            // Borrow the UTF-8 of the Python strings: they stay alive (and immutable) in `batch`
            // while the GIL is released.
            let texts: Vec<&str> = batch.iter().map(|s| s.to_str()).collect::<PyResult<_>>()?;
            py.detach(|| counter.add_texts(&texts))
                .map_err(PyRuntimeError::new_err)?;
            if batch.len() < buffer_size {
                break;
            }
            py.check_signals()?; // Ctrl-C between batches
        }
        drop(batch);
        if counter.total_bytes == 0 {
            return Err(to_py_err(BpeError::EmptyCorpus));
        }
        let merges = py.detach(move || train(counter.into_words(), n_merges));
        self.encoder = Encoder::new(&pattern, &merges).map_err(PyRuntimeError::new_err)?;
        self.merges = merges;
        self.pattern = pattern;
        Ok(())
    }

    /// The split pattern (regex) the tokenizer uses.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// The merges in order: merge `i` makes token `256 + i` from the pair `(left, right)`.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.merges.clone()
    }

    /// `(token bytes, token id)` for every token: the 256 single bytes, then the merges. This is
    /// the `mergeable_ranks` argument of `tiktoken.Encoding`.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, b), i as u32))
            .collect()
    }

    /// The token ids of `text`.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        if text.len() < 4096 {
            return self.encoder.encode(text).map_err(PyRuntimeError::new_err);
        }
        py.detach(|| self.encoder.encode(text))
            .map_err(PyRuntimeError::new_err)
    }

    /// Encode many texts in parallel (rayon), with the GIL released.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.detach(|| self.encoder.encode_batch(&texts))
            .map_err(PyRuntimeError::new_err)
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "an object of unknown type".into())
}

#[pymodule]
fn nanochat_rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Tokenizer>()?;
    Ok(())
}
