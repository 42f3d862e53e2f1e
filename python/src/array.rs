//! [`Array`]: an n-dimensional view of the package's memory, exported through DLPack to torch
//! or NumPy without a copy. Every export holds the memory's owner, so the memory lives until
//! the consumer frees its last tensor, view or array of it (the capsule's deleter).
use std::ffi::c_void;
use std::sync::Arc;

use dlpark::ffi::{DLDataType, DLDevice, DLManagedTensor, DLManagedTensorVersioned};
use dlpark::python::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use cifar_data::pipeline::Dtype;

use crate::pool::Lease;

/// The memory an [`Array`] shows.
pub enum Owner {
    /// One batch's images: the buffer goes back to its pool when the last view of it goes.
    Batch(Lease, Dtype),
    /// One batch's labels, in their own allocation: keeping them keeps no images alive.
    Labels(Vec<i64>),
    /// One sample's values (`ds[i]`).
    Sample(Vec<f32>),
    /// One sample's pixels (`ds[i]` of a transform that stops at `ToImage()`).
    SampleU8(Vec<u8>),
}

impl Owner {
    fn data(&self) -> *mut c_void {
        match self {
            Owner::Batch(lease, _) => lease.buffer().images.as_ptr() as *mut c_void,
            Owner::Labels(v) => v.as_ptr() as *mut c_void,
            Owner::Sample(v) => v.as_ptr() as *mut c_void,
            Owner::SampleU8(v) => v.as_ptr() as *mut c_void,
        }
    }

    fn dtype(&self) -> DLDataType {
        match self {
            Owner::Labels(_) => DLDataType::of::<i64>(),
            Owner::Batch(_, Dtype::U8) | Owner::SampleU8(_) => DLDataType::of::<u8>(),
            Owner::Batch(_, Dtype::F32) | Owner::Sample(_) => DLDataType::of::<f32>(),
        }
    }
}

/// An n-dimensional array of the package's memory, exported through DLPack: pass it to
/// `torch.from_dlpack` or `numpy.from_dlpack` (zero-copy; every export keeps the memory alive).
#[pyclass(module = "cifar_fast._native", frozen)]
#[derive(Clone)]
pub struct Array {
    owner: Arc<Owner>,
    shape: Vec<i64>,
}

impl Array {
    /// `owner`'s memory as an array of `shape`; the owner holds at least that many elements.
    pub fn new(owner: Owner, shape: Vec<i64>) -> Array {
        Array { owner: Arc::new(owner), shape }
    }

    /// The legacy DLPack capsule of this array, which every torch 2.x takes as it is.
    pub fn capsule(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        export_dlpack(self, py, ExportRequest::parse(None, None, None, None)?)
    }

    fn export<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let strides = compact_strides(&self.shape);
        let meta = dlpark::metadata::Dynamic::new(self.shape.clone(), strides);
        let mut init = meta
            .prepare_as::<M>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?
            .initialize(self.owner.clone());
        init.set_data(self.owner.data());
        init.set_dtype(self.owner.dtype());
        init.set_device(DLDevice::CPU);
        // SAFETY: the data pointer is valid for the shape and dtype (the owner holds that many
        // elements, never moves them, and rides along as the context, so it lives until the
        // consumer's deleter); the strides are explicit and compact; no flag is set (writable,
        // not copied).
        Ok(unsafe { init.finish() })
    }
}

fn compact_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    strides
}

impl DlpackExporter for Array {
    fn device(&self) -> DLDevice {
        DLDevice::CPU
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.export()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.export()
    }
}

#[pymethods]
impl Array {
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __dlpack_device__(&self) -> (u32, i32) {
        (1, 0)
    }

    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }
}
