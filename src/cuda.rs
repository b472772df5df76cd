//! What libtorch offers for CUDA and tch does not wrap, through the C++ shim in
//! `src/cuda.cpp`: CUDA graphs (capture a sequence of libtorch calls once, replay it with one
//! launch), the caching allocator's peak memory, TF32 matmuls and bf16 autocast.
//!
//! When libtorch has no CUDA, or no CUDA headers were found at build time, the shim is not
//! built: [`available`] is false and every constructor returns an error.

use anyhow::Result;

#[cfg(ptb_cuda_shim)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    extern "C" {
        pub fn ptb_free_message(msg: *mut c_char);
        pub fn ptb_graph_new(device: i64, err: *mut *mut c_char) -> *mut c_void;
        pub fn ptb_graph_free(g: *mut c_void);
        pub fn ptb_graph_enter(g: *mut c_void, capture: c_int, err: *mut *mut c_char) -> c_int;
        pub fn ptb_graph_exit(g: *mut c_void, capture: c_int, err: *mut *mut c_char) -> c_int;
        pub fn ptb_graph_replay(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn ptb_cuda_peak_allocated(device: i64) -> i64;
        pub fn ptb_cuda_reset_peak(device: i64);
        pub fn ptb_set_matmul_tf32(on: c_int);
        pub fn ptb_autocast_bf16_enter() -> c_int;
        pub fn ptb_autocast_exit(was: c_int);
    }
}

/// Whether this build can capture CUDA graphs.
pub fn available() -> bool {
    cfg!(ptb_cuda_shim)
}

/// Peak bytes held by libtorch's CUDA allocator on `device` since the last reset.
pub fn peak_allocated_bytes(device: usize) -> Option<u64> {
    #[cfg(ptb_cuda_shim)]
    {
        // SAFETY: plain call; the shim catches C++ exceptions and returns -1.
        let v = unsafe { ffi::ptb_cuda_peak_allocated(device as i64) };
        (v >= 0).then_some(v as u64)
    }
    #[cfg(not(ptb_cuda_shim))]
    {
        let _ = device;
        None
    }
}

/// Free and total bytes of the current GPU (cuda:0 for ptb-lm), from the CUDA runtime that
/// libtorch loaded (`cudaMemGetInfo`, looked up at run time, so nothing more is linked).
/// None without CUDA, or where the runtime says no.
pub fn memory_info() -> Option<(u64, u64)> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches what is loaded.
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cudaMemGetInfo".as_ptr()) };
    if sym.is_null() {
        return None;
    }
    // SAFETY: cudaMemGetInfo(size_t* free, size_t* total) -> cudaError_t, as declared by CUDA.
    let f: MemGetInfo = unsafe { std::mem::transmute::<*mut libc::c_void, MemGetInfo>(sym) };
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two valid out-pointers.
    let rc = unsafe { f(&mut free, &mut total) };
    (rc == 0 && total > 0).then_some((free as u64, total as u64))
}

pub fn reset_peak(device: usize) {
    #[cfg(ptb_cuda_shim)]
    // SAFETY: plain call; the shim catches C++ exceptions.
    unsafe {
        ffi::ptb_cuda_reset_peak(device as i64)
    };
    #[cfg(not(ptb_cuda_shim))]
    let _ = device;
}

/// TF32 tensor cores for float32 matmuls (no effect without the shim).
pub fn set_matmul_tf32(on: bool) {
    #[cfg(ptb_cuda_shim)]
    // SAFETY: plain call; the shim catches C++ exceptions.
    unsafe {
        ffi::ptb_set_matmul_tf32(on as i32)
    };
    #[cfg(not(ptb_cuda_shim))]
    let _ = on;
}

/// Runs `f` with CUDA autocast in bfloat16 when `on` (matmuls and the RNN layers in bf16;
/// float32 elsewhere). Without the shim, `f` runs as it is.
pub fn autocast_bf16<T>(on: bool, f: impl FnOnce() -> T) -> T {
    #[cfg(ptb_cuda_shim)]
    if on {
        // SAFETY: plain calls; the shim catches C++ exceptions. Exit runs even on panic.
        struct Exit(i32);
        impl Drop for Exit {
            fn drop(&mut self) {
                unsafe { ffi::ptb_autocast_exit(self.0) }
            }
        }
        let _exit = Exit(unsafe { ffi::ptb_autocast_bf16_enter() });
        return f();
    }
    let _ = on;
    f()
}

/// One captured graph with its side stream.
pub struct CudaGraph {
    #[cfg(ptb_cuda_shim)]
    ptr: *mut std::os::raw::c_void,
    captured: bool,
}

/// The first line of a message a C++ shim (`cuda.cpp`, `dist.cpp`, `cpu.cpp`) returned, which is then
/// freed with the shim's `free` (null: "unknown error").
#[cfg(any(ptb_cuda_shim, ptb_gloo, ptb_cpu_kernel))]
pub(crate) fn shim_message(
    err: *mut std::os::raw::c_char,
    free: unsafe extern "C" fn(*mut std::os::raw::c_char),
) -> String {
    if err.is_null() {
        return "unknown error".to_string();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'ed string, freed right after.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { free(err) };
    s.lines().next().unwrap_or_default().to_string()
}

#[cfg(ptb_cuda_shim)]
fn check(rc: i32, err: *mut std::os::raw::c_char, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    anyhow::bail!("CUDA {what}: {}", shim_message(err, ffi::ptb_free_message))
}

impl CudaGraph {
    pub fn new(device: usize) -> Result<CudaGraph> {
        #[cfg(ptb_cuda_shim)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: the shim returns null and sets err on failure.
            let ptr = unsafe { ffi::ptb_graph_new(device as i64, &mut err) };
            check(if ptr.is_null() { 1 } else { 0 }, err, "graph creation")?;
            Ok(CudaGraph { ptr, captured: false })
        }
        #[cfg(not(ptb_cuda_shim))]
        {
            let _ = device;
            anyhow::bail!("this ptb-lm was built without CUDA graph support")
        }
    }

    /// Runs `f` on the graph's side stream without capturing (warm-up, as PyTorch does
    /// before capture so lazy initialisation does not happen inside the graph).
    pub fn warmup<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        self.on_side_stream(false, f)
    }

    /// Captures the CUDA work of `f` (which runs once on the host, but nothing executes on
    /// the GPU) into the graph.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        let out = self.on_side_stream(true, f)?;
        self.captured = true;
        Ok(out)
    }

    #[allow(unused_variables, unused_mut)]
    fn on_side_stream<T>(&mut self, capture: bool, f: impl FnOnce() -> T) -> Result<T> {
        #[cfg(ptb_cuda_shim)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: self.ptr is a live graph handle.
            check(unsafe { ffi::ptb_graph_enter(self.ptr, capture as i32, &mut err) }, err, "graph capture start")?;
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let mut err = std::ptr::null_mut();
            // SAFETY: always leave the side stream, even when f panicked.
            let rc = unsafe { ffi::ptb_graph_exit(self.ptr, capture as i32, &mut err) };
            let out = out.map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                anyhow::anyhow!("CUDA graph capture: {}", msg.lines().next().unwrap_or_default())
            })?;
            check(rc, err, "graph capture end")?;
            Ok(out)
        }
        #[cfg(not(ptb_cuda_shim))]
        {
            let _ = f;
            anyhow::bail!("this ptb-lm was built without CUDA graph support")
        }
    }

    pub fn is_captured(&self) -> bool {
        self.captured
    }

    /// Launches the captured work on the current stream.
    pub fn replay(&self) -> Result<()> {
        #[cfg(ptb_cuda_shim)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: self.ptr is a live graph handle.
            check(unsafe { ffi::ptb_graph_replay(self.ptr, &mut err) }, err, "graph replay")
        }
        #[cfg(not(ptb_cuda_shim))]
        anyhow::bail!("this ptb-lm was built without CUDA graph support")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(ptb_cuda_shim)]
        // SAFETY: the handle came from ptb_graph_new and is freed once.
        unsafe {
            ffi::ptb_graph_free(self.ptr)
        };
    }
}
