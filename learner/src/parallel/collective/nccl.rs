//! The GPU backend (never run on a GPU yet): raw NCCL calls (through cudarc, loaded at run time) on the device
//! pointers of CUDA tensors, f32 and bf16. libtorch runs its kernels on the legacy default
//! stream, so the collectives are queued there too and ordered with them; completion is
//! polled so a dead rank becomes a timeout error (the communicator is aborted) instead of a
//! hang. Before any NCCL call the backend checks that CUDA and libnccl are present and says
//! clearly what is missing.

use super::{Collective, CollectiveError, ReduceOp, Result};
use std::time::Duration;
use tch::{Device, Tensor};

/// Size of an NCCL communicator id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

fn unavailable(reason: impl Into<String>) -> CollectiveError {
    CollectiveError::Unavailable {
        backend: "nccl",
        reason: reason.into(),
    }
}

#[cfg(feature = "nccl")]
mod imp {
    use super::*;
    use crate::parallel::collective::check_parts;
    use cudarc::driver::sys as cuda;
    use cudarc::nccl::{result, sys};
    use std::time::Instant;
    use tch::Kind;

    /// Checks, without calling into NCCL, that it can run here.
    pub fn check_available() -> Result<()> {
        if !tch::Cuda::is_available() {
            return Err(unavailable(
                "no CUDA device is visible to libtorch; on CPU use `parallel.collective = \"ring\"`",
            ));
        }
        // SAFETY: only probes whether the shared libraries can be opened.
        if !unsafe { cuda::is_culib_present() } {
            return Err(unavailable(
                "the CUDA driver library (libcuda.so) cannot be loaded",
            ));
        }
        // SAFETY: as above.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "libnccl.so.2 cannot be loaded (install NCCL or add its lib folder to the library path)",
            ));
        }
        Ok(())
    }

    /// A fresh communicator id (rank 0 makes it and hands it to the other ranks).
    pub fn nccl_unique_id() -> Result<Vec<u8>> {
        check_available()?;
        let id =
            result::get_uniqueid().map_err(|e| unavailable(format!("ncclGetUniqueId: {e:?}")))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    fn red_op(op: ReduceOp) -> sys::ncclRedOp_t {
        match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Average => sys::ncclRedOp_t::ncclAvg,
        }
    }

    /// An NCCL communicator over the learner ranks, one CUDA device per rank.
    pub struct NcclCollective {
        comm: sys::ncclComm_t,
        rank: usize,
        world: usize,
        device: usize,
        timeout: Duration,
        aborted: bool,
    }

    // SAFETY: the communicator is only used from the thread that owns this value; NCCL
    // communicators may move between threads.
    unsafe impl Send for NcclCollective {}

    impl NcclCollective {
        /// Joins the communicator `id` as `rank` of `world` on CUDA device `device`.
        pub fn new(
            rank: usize,
            world: usize,
            id: &[u8],
            device: usize,
            timeout: Duration,
        ) -> Result<Self> {
            check_available()?;
            if id.len() != NCCL_ID_BYTES {
                return Err(CollectiveError::Setup(format!(
                    "the NCCL id has {} bytes, not {NCCL_ID_BYTES}",
                    id.len()
                )));
            }
            let mut unique = sys::ncclUniqueId {
                internal: [0; NCCL_ID_BYTES],
            };
            for (dst, &src) in unique.internal.iter_mut().zip(id) {
                *dst = src as _;
            }
            // Makes the device current on this thread (libtorch creates its context).
            let _ = Tensor::zeros([1], (Kind::Float, Device::Cuda(device)));
            let mut comm = std::ptr::null_mut();
            // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId.
            unsafe { result::comm_init_rank(&mut comm, world as i32, unique, rank as i32) }
                .map_err(|e| CollectiveError::Setup(format!("ncclCommInitRank: {e:?}")))?;
            Ok(NcclCollective {
                comm,
                rank,
                world,
                device,
                timeout,
                aborted: false,
            })
        }

        fn check_tensor(&self, tensor: &Tensor) -> Result<sys::ncclDataType_t> {
            if tensor.device() != Device::Cuda(self.device) {
                return Err(unavailable(format!(
                    "rank {} holds tensors on cuda:{}, got one on {:?}",
                    self.rank,
                    self.device,
                    tensor.device()
                )));
            }
            if !tensor.is_contiguous() {
                return Err(unavailable("collectives need contiguous tensors"));
            }
            match tensor.kind() {
                Kind::Float => Ok(sys::ncclDataType_t::ncclFloat32),
                Kind::BFloat16 => Ok(sys::ncclDataType_t::ncclBfloat16),
                other => Err(unavailable(format!(
                    "unsupported dtype {other:?} (f32 or bf16)"
                ))),
            }
        }

        /// Waits for the queued collective: polls the stream, fails on an NCCL async error,
        /// aborts the communicator when the timeout passes.
        fn wait(&mut self, op: &'static str) -> Result<()> {
            let started = Instant::now();
            loop {
                // SAFETY: queries the legacy default stream of the current context.
                match unsafe { cuda::cuStreamQuery(std::ptr::null_mut()) } {
                    cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                    cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                    other => {
                        return Err(CollectiveError::Setup(format!(
                            "{op}: CUDA error {other:?}"
                        )))
                    }
                }
                let mut state = sys::ncclResult_t::ncclSuccess;
                // SAFETY: `comm` is live; `state` is a valid out-pointer.
                unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
                if state != sys::ncclResult_t::ncclSuccess
                    && state != sys::ncclResult_t::ncclInProgress
                {
                    self.abort();
                    return Err(CollectiveError::Stalled {
                        op,
                        detail: format!("NCCL reported {state:?}: a rank died or failed"),
                    });
                }
                if started.elapsed() > self.timeout {
                    self.abort();
                    return Err(CollectiveError::Stalled {
                        op,
                        detail: format!(
                            "not finished within {:.0} s (collective timeout): a rank died or hangs",
                            self.timeout.as_secs_f64()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }

        /// The NCCL dtype of an input/output pair: both checked, and of the same kind.
        fn check_pair(
            &self,
            op: &'static str,
            input: &Tensor,
            output: &Tensor,
        ) -> Result<sys::ncclDataType_t> {
            let dtype = self.check_tensor(input)?;
            self.check_tensor(output)?;
            if input.kind() != output.kind() {
                return Err(CollectiveError::Mismatch {
                    op,
                    detail: format!("input is {:?}, output {:?}", input.kind(), output.kind()),
                });
            }
            Ok(dtype)
        }

        fn abort(&mut self) {
            if !self.aborted {
                self.aborted = true;
                // SAFETY: `comm` is live and no longer used after this.
                let _ = unsafe { result::comm_abort(self.comm) };
            }
        }

        fn check_live(&self, op: &'static str) -> Result<()> {
            if self.aborted {
                return Err(CollectiveError::Stalled {
                    op,
                    detail: "the communicator was aborted by an earlier failure".into(),
                });
            }
            Ok(())
        }
    }

    impl Drop for NcclCollective {
        fn drop(&mut self) {
            if !self.aborted {
                // SAFETY: `comm` is live and dropped once.
                let _ = unsafe { result::comm_destroy(self.comm) };
            }
        }
    }

    impl Collective for NcclCollective {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
            self.check_live("all_reduce")?;
            let dtype = self.check_tensor(tensor)?;
            let red = red_op(op);
            let ptr = tensor.data_ptr();
            // SAFETY: `ptr` is the tensor's contiguous device memory of `numel` elements.
            unsafe {
                result::all_reduce(
                    ptr,
                    ptr,
                    tensor.numel(),
                    dtype,
                    red,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(|e| CollectiveError::Setup(format!("ncclAllReduce: {e:?}")))?;
            self.wait("all_reduce")
        }

        fn reduce_scatter(
            &mut self,
            input: &Tensor,
            output: &mut Tensor,
            op: ReduceOp,
        ) -> Result<()> {
            self.check_live("reduce_scatter")?;
            let dtype = self.check_pair("reduce_scatter", input, output)?;
            check_parts("reduce_scatter", input, output, self.world)?;
            // SAFETY: both pointers are contiguous device memory of the checked sizes
            // (`K·n` and `n` elements of `dtype`).
            unsafe {
                result::reduce_scatter(
                    input.data_ptr(),
                    output.data_ptr(),
                    output.numel(),
                    dtype,
                    red_op(op),
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(|e| CollectiveError::Setup(format!("ncclReduceScatter: {e:?}")))?;
            self.wait("reduce_scatter")
        }

        fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
            self.check_live("all_gather")?;
            let dtype = self.check_pair("all_gather", input, output)?;
            check_parts("all_gather", output, input, self.world)?;
            // SAFETY: as in reduce_scatter (`n` and `K·n` elements).
            unsafe {
                result::all_gather(
                    input.data_ptr(),
                    output.data_ptr(),
                    input.numel(),
                    dtype,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(|e| CollectiveError::Setup(format!("ncclAllGather: {e:?}")))?;
            self.wait("all_gather")
        }

        fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
            self.check_live("broadcast")?;
            let dtype = self.check_tensor(tensor)?;
            let ptr = tensor.data_ptr();
            // SAFETY: as in all_reduce.
            unsafe {
                result::broadcast(
                    ptr,
                    ptr,
                    tensor.numel(),
                    dtype,
                    root as i32,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map_err(|e| CollectiveError::Setup(format!("ncclBroadcast: {e:?}")))?;
            self.wait("broadcast")
        }

        fn barrier(&mut self) -> Result<()> {
            let mut one = Tensor::ones([1], (Kind::Float, Device::Cuda(self.device)));
            self.all_reduce(&mut one, ReduceOp::Sum)
        }
    }
}

#[cfg(not(feature = "nccl"))]
mod imp {
    use super::*;

    const NOT_BUILT: &str = "quill was built without the `nccl` feature";

    /// Always fails: NCCL support was not compiled in.
    pub fn nccl_unique_id() -> Result<Vec<u8>> {
        Err(unavailable(NOT_BUILT))
    }

    /// The NCCL backend (not compiled in: construction fails).
    pub struct NcclCollective(std::convert::Infallible);

    impl NcclCollective {
        /// Always fails: NCCL support was not compiled in.
        pub fn new(_: usize, _: usize, _: &[u8], _: usize, _: Duration) -> Result<Self> {
            Err(unavailable(NOT_BUILT))
        }
    }

    impl Collective for NcclCollective {
        fn rank(&self) -> usize {
            match self.0 {}
        }
        fn world_size(&self) -> usize {
            match self.0 {}
        }
        fn all_reduce(&mut self, _: &mut Tensor, _: ReduceOp) -> Result<()> {
            match self.0 {}
        }
        fn reduce_scatter(&mut self, _: &Tensor, _: &mut Tensor, _: ReduceOp) -> Result<()> {
            match self.0 {}
        }
        fn all_gather(&mut self, _: &Tensor, _: &mut Tensor) -> Result<()> {
            match self.0 {}
        }
        fn broadcast(&mut self, _: &mut Tensor, _: usize) -> Result<()> {
            match self.0 {}
        }
        fn barrier(&mut self) -> Result<()> {
            match self.0 {}
        }
    }
}

pub use imp::{nccl_unique_id, NcclCollective};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "nccl")]
    fn without_cuda_nccl_says_why_before_any_call() {
        if tch::Cuda::is_available() {
            return;
        }
        let err = nccl_unique_id().unwrap_err().to_string();
        assert!(
            err.contains("collective backend nccl") && err.contains("CUDA"),
            "{err}"
        );
        let err = NcclCollective::new(0, 2, &[0; NCCL_ID_BYTES], 0, Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("no CUDA device") && err.contains("parallel.collective = \"ring\""),
            "{err}"
        );
    }
}
