//! Dense matrix products on cuBLAS: [`linear`] (the `nn.Linear` convention, weight `[n, k]`)
//! and [`matmul_strided_batched`]; `linear` with at most eight rows runs on `kernels/gemv.cu`
//! instead (see `super::gemv`). f32, f16 or bf16 operands, always accumulated in f32
//! (`CUBLAS_COMPUTE_32F`: tensor cores for f16/bf16, strict f32 without TF32 for f32).
//!
//! cuBLAS is column-major and our tensors are row-major. A row-major `[r, c]` matrix is the
//! column-major `[c, r]` matrix of the same memory, so `C = A·B` in row-major is computed as
//! `Cᵀ = Bᵀ·Aᵀ` in cuBLAS's terms, with no copies.

use std::ffi::{c_int, c_longlong, c_void};
use std::sync::{Arc, Mutex, PoisonError};

use pagoda_tensor::cudarc::cublas::{CudaBlas, result as cublas, sys};
use pagoda_tensor::cudarc::driver::{DevicePtr, DevicePtrMut};
use pagoda_tensor::{CudaDevice, DType, Tensor};

use super::activation::broadcast_rows;
use super::gemv;
use super::tensor_access::{
    FLOAT_DTYPES, alloc_output, common_device, device_view, dims_of, expect_dtype,
    expect_same_dtype, into_tensor,
};
use crate::ops::{Epilogue, OutputActivation};
use crate::{Error, Result};

/// One cuBLAS handle per device, created on first use. A handle must not be used by two
/// threads at once, hence the mutex; it is held only while a call is queued.
static HANDLES: Mutex<Vec<Option<Arc<Mutex<CudaBlas>>>>> = Mutex::new(Vec::new());

fn handle(op: &'static str, device: &CudaDevice) -> Result<Arc<Mutex<CudaBlas>>> {
    // A poisoned lock only means another thread panicked; the table itself stays valid.
    let mut handles = HANDLES.lock().unwrap_or_else(PoisonError::into_inner);
    let ordinal = device.ordinal();
    if let Some(Some(handle)) = handles.get(ordinal) {
        return Ok(Arc::clone(handle));
    }
    // SAFETY: this only tries to open the library with `dlopen`; cudarc would panic instead.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::cuda(
            op,
            "the cuBLAS library (libcublas) was not found",
        ));
    }
    let blas = CudaBlas::new(Arc::clone(device.stream())).map_err(|e| {
        Error::cuda(
            op,
            format!("creating a cuBLAS handle on cuda:{ordinal}: {e}"),
        )
    })?;
    let blas = Arc::new(Mutex::new(blas));
    if handles.len() <= ordinal {
        handles.resize(ordinal + 1, None);
    }
    handles[ordinal] = Some(Arc::clone(&blas));
    Ok(blas)
}

/// cuBLAS works in the calling thread's current context, which kernel launches set but a thread
/// whose first GPU call is a product may not have.
fn bind_context(op: &'static str, device: &CudaDevice) -> Result<()> {
    device.context().bind_to_thread().map_err(|e| {
        Error::cuda(
            op,
            format!("making cuda:{}'s context current: {e}", device.ordinal()),
        )
    })
}

fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
        _ => None,
    }
}

fn c_int_arg(op: &'static str, name: &str, value: usize) -> Result<c_int> {
    c_int::try_from(value).map_err(|_| {
        Error::shape(
            op,
            format!("{name} = {value} exceeds cuBLAS's 32-bit dimensions"),
        )
    })
}

/// `x · wᵀ (+ bias)`: `x` is `[.., k]`, `w` is `[n, k]` (the `nn.Linear` layout), the result
/// `[.., n]` in `x`'s dtype. `x` and `w` share a dtype; `bias` (`[n]`) is f32 or that dtype and
/// is added inside the product's f32 accumulation (the output is seeded with it and cuBLAS
/// computes `1·x·wᵀ + 1·bias`), so the result is rounded once. Products of at most
/// eight rows (decode) run on a dedicated kernel instead, with the same f32 accumulation and
/// single rounding.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let mut tensors = vec![("x", x), ("w", w)];
    tensors.extend(bias.map(|b| ("bias", b)));
    let device = common_device(OP, &tensors)?;
    expect_dtype(OP, "x", x, &FLOAT_DTYPES)?;
    expect_same_dtype(OP, "w", w, "x", x.dtype())?;
    let [n, k] = dims_of(OP, "w", w)?;
    let Some((&x_k, outer)) = x.dims().split_last() else {
        return Err(Error::shape(OP, "x must have at least one dimension"));
    };
    if x_k != k {
        return Err(Error::shape(
            OP,
            format!("x has {x_k} columns but w has shape [{n}, {k}]"),
        ));
    }
    let m: usize = outer.iter().product();
    let mut dims = outer.to_vec();
    dims.push(n);
    if (1..=DECODE_MAX_ROWS).contains(&m) && n > 0 {
        // Decode-sized products: one kernel launch costs the host far less than a cuBLAS call.
        return gemv::gemv(
            OP,
            &device,
            gemv::Product {
                x,
                w,
                second: None,
                bias,
                epilogue: Epilogue::default(),
                sizes: (m, n, k),
                dims: &dims,
            },
        );
    }

    let mut out = alloc_output(OP, &device, x.dtype(), &dims)?;
    let stream = device.stream();
    match bias {
        Some(bias) => broadcast_rows(OP, &device, bias, out.slice_mut(), x.dtype(), m, n)?,
        None if k == 0 && m * n > 0 => stream
            .memset_zeros(out.slice_mut())
            .map_err(|e| Error::cuda(OP, format!("zeroing the output: {e}")))?,
        None => {}
    }
    if m == 0 || n == 0 || k == 0 {
        return into_tensor(out, &dims);
    }

    let dtype = data_type(x.dtype()).ok_or_else(|| Error::dtype(OP, "x must be a float tensor"))?;
    let (m_arg, n_arg, k_arg) = (
        c_int_arg(OP, "m", m)?,
        c_int_arg(OP, "n", n)?,
        c_int_arg(OP, "k", k)?,
    );
    let alpha = 1.0f32;
    let beta = if bias.is_some() { 1.0f32 } else { 0.0 };
    let x_view = device_view(OP, "x", x)?;
    let w_view = device_view(OP, "w", w)?;
    let blas = handle(OP, &device)?;
    bind_context(OP, &device)?;
    let blas = blas.lock().unwrap_or_else(PoisonError::into_inner);
    {
        let (x_ptr, _x_sync) = x_view.device_ptr(stream);
        let (w_ptr, _w_sync) = w_view.device_ptr(stream);
        let out_slice = out.slice_mut();
        let (out_ptr, _out_sync) = out_slice.device_ptr_mut(stream);
        // Column-major: outᵀ [n, m] = (w as col-major [k, n])ᵀ · (x as col-major [k, m]).
        // SAFETY: the pointers hold w (n x k), x (m x k) and out (m x n) elements of `dtype`, as
        // checked above; leading dimensions are the row lengths k, k and n; alpha and beta are
        // host f32 values as CUBLAS_COMPUTE_32F requires; the handle is used under its lock.
        unsafe {
            cublas::gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n_arg,
                m_arg,
                k_arg,
                (&alpha as *const f32).cast::<c_void>(),
                w_ptr as *const c_void,
                dtype,
                k_arg,
                x_ptr as *const c_void,
                dtype,
                k_arg,
                (&beta as *const f32).cast::<c_void>(),
                out_ptr as *mut c_void,
                dtype,
                n_arg,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::cuda(OP, format!("cublasGemmEx ({m} x {k}) · ({n} x {k})ᵀ: {e}")))?;
    }
    drop(blas);
    into_tensor(out, &dims)
}
/// The most rows of `x` [`linear_with_epilogue`] takes.
pub const EPILOGUE_MAX_ROWS: usize = gemv::MAX_ROWS;

/// Up to this many rows of `x`, [`linear`] (and the fused forms of `ops`) run the skinny GEMV;
/// from three rows on cuBLAS is faster, even with the elementwise steps it leaves to separate
/// kernels. Engine decode steps of 1 to 8 sequences (H100, f16, Pythia-2.8B / Llama-3.2-3B):
/// with the GEMV up to 2 rows, 3.50-3.77 ms per step for 2 to 8 sequences; with it up to 4 rows,
/// 4.26-4.29 ms at 3 and 4; with it up to 8, 6.3-6.4 ms at 6 and 8. At 2 rows both are within
/// 2% of each other.
pub const DECODE_MAX_ROWS: usize = 2;

/// `epilogue(x [.., k] · w [n, k]ᵀ + bias)` for at most [`EPILOGUE_MAX_ROWS`] rows of `x`, in one
/// kernel: the decode-time product with the elementwise step that follows it fused in. With
/// [`OutputActivation::SiluGate`] `w` (and the bias) stack `n` gate rows over `n` up rows and
/// the output has `n` columns; an addend has the output's shape and dtype.
pub fn linear_with_epilogue(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    const OP: &str = "linear_with_epilogue";
    let job = LinearJob {
        x,
        w,
        bias,
        epilogue,
    };
    let (device, sizes, dims) = check_job(OP, &job)?;
    gemv::gemv(OP, &device, job.product(sizes, &dims))
}

/// One decode-sized product of [`linear_side_by_side`]: `epilogue(x · wᵀ + bias)`, as
/// [`linear_with_epilogue`] takes it.
#[derive(Clone, Copy, Debug)]
pub struct LinearJob<'a> {
    pub x: &'a Tensor,
    pub w: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub epilogue: Epilogue<'a>,
}

impl<'a> LinearJob<'a> {
    fn product(&self, sizes: (usize, usize, usize), dims: &'a [usize]) -> gemv::Product<'a> {
        gemv::Product {
            x: self.x,
            w: self.w,
            second: None,
            bias: self.bias,
            epilogue: self.epilogue,
            sizes,
            dims,
        }
    }
}

/// A job's device, (m, n, k) and output shape.
type JobShape = (CudaDevice, (usize, usize, usize), Vec<usize>);

/// The device, (m, n, k) and output shape of a job, after checking its operands.
fn check_job(op: &'static str, job: &LinearJob<'_>) -> Result<JobShape> {
    let LinearJob {
        x,
        w,
        bias,
        epilogue,
    } = *job;
    let mut tensors = vec![("x", x), ("w", w)];
    tensors.extend(bias.map(|b| ("bias", b)));
    tensors.extend(epilogue.addend.map(|a| ("addend", a)));
    let device = common_device(op, &tensors)?;
    expect_dtype(op, "x", x, &FLOAT_DTYPES)?;
    expect_same_dtype(op, "w", w, "x", x.dtype())?;
    let [rows, k] = dims_of(op, "w", w)?;
    let n = if epilogue.activation == OutputActivation::SiluGate {
        if rows % 2 != 0 {
            return Err(Error::shape(
                op,
                format!("a gated product needs gate and up rows in equal number, w has {rows}"),
            ));
        }
        rows / 2
    } else {
        rows
    };
    let Some((&x_k, outer)) = x.dims().split_last() else {
        return Err(Error::shape(op, "x must have at least one dimension"));
    };
    if x_k != k {
        return Err(Error::shape(
            op,
            format!("x has {x_k} columns but w has shape [{rows}, {k}]"),
        ));
    }
    let m: usize = outer.iter().product();
    if !(1..=EPILOGUE_MAX_ROWS).contains(&m) || n == 0 {
        return Err(Error::shape(
            op,
            format!("takes 1..={EPILOGUE_MAX_ROWS} rows and outputs, got {m} rows, {n} outputs"),
        ));
    }
    let mut dims = outer.to_vec();
    dims.push(n);
    Ok((device, (m, n, k), dims))
}

/// Two independent decode-sized products, each as [`linear_with_epilogue`] computes it, in one
/// kernel launch: the GPU ramps up and drains once for both (GPT-NeoX's QKV projection and MLP
/// up projection, whose inputs one norm kernel produces). Both on one device, in one dtype.
pub fn linear_side_by_side(a: LinearJob<'_>, b: LinearJob<'_>) -> Result<(Tensor, Tensor)> {
    const OP: &str = "linear_side_by_side";
    let (device, a_sizes, a_dims) = check_job(OP, &a)?;
    let (b_device, b_sizes, b_dims) = check_job(OP, &b)?;
    if b_device.ordinal() != device.ordinal() {
        return Err(Error::device(
            OP,
            format!(
                "the products are on cuda:{} and cuda:{}",
                device.ordinal(),
                b_device.ordinal()
            ),
        ));
    }
    gemv::gemv_pair(
        OP,
        &device,
        a.product(a_sizes, &a_dims),
        b.product(b_sizes, &b_dims),
    )
}

/// `x [.., k] · w [n, k]ᵀ + bias + x2 [.., k2] · w2 [n, k2]ᵀ + bias2 + addend` for at most
/// [`EPILOGUE_MAX_ROWS`] rows, in one kernel: two products into the same outputs (GPT-NeoX's
/// attention output projection and MLP down projection, which a parallel-residual block sums)
/// cost one pass over both weights and one launch. `x` and `x2` have the same leading
/// dimensions; an addend has the output's shape and dtype.
pub fn linear_pair(
    (x, w, bias): (&Tensor, &Tensor, Option<&Tensor>),
    (x2, w2, bias2): (&Tensor, &Tensor, Option<&Tensor>),
    addend: Option<&Tensor>,
) -> Result<Tensor> {
    const OP: &str = "linear_pair";
    let mut tensors = vec![("x", x), ("w", w), ("x2", x2), ("w2", w2)];
    tensors.extend(bias.map(|b| ("bias", b)));
    tensors.extend(bias2.map(|b| ("bias2", b)));
    tensors.extend(addend.map(|a| ("addend", a)));
    let device = common_device(OP, &tensors)?;
    expect_dtype(OP, "x", x, &FLOAT_DTYPES)?;
    for (name, t) in [("w", w), ("x2", x2), ("w2", w2)] {
        expect_same_dtype(OP, name, t, "x", x.dtype())?;
    }
    let [n, k] = dims_of(OP, "w", w)?;
    let [n2, k2] = dims_of(OP, "w2", w2)?;
    if n2 != n {
        return Err(Error::shape(
            OP,
            format!("w has {n} rows but w2 {n2}: both products must have the same outputs"),
        ));
    }
    let (Some((&x_k, outer)), Some((&x2_k, outer2))) =
        (x.dims().split_last(), x2.dims().split_last())
    else {
        return Err(Error::shape(
            OP,
            "x and x2 must have at least one dimension",
        ));
    };
    if x_k != k || x2_k != k2 || outer != outer2 {
        return Err(Error::shape(
            OP,
            format!(
                "x {:?} and x2 {:?} do not match w [{n}, {k}] and w2 [{n}, {k2}]",
                x.dims(),
                x2.dims()
            ),
        ));
    }
    let m: usize = outer.iter().product();
    if !(1..=EPILOGUE_MAX_ROWS).contains(&m) || n == 0 {
        return Err(Error::shape(
            OP,
            format!("takes 1..={EPILOGUE_MAX_ROWS} rows and outputs, got {m} rows, {n} outputs"),
        ));
    }
    let mut dims = outer.to_vec();
    dims.push(n);
    let second = gemv::SecondProduct {
        x: x2,
        w: w2,
        bias: bias2,
        k: k2,
    };
    let epilogue = Epilogue {
        activation: crate::ops::OutputActivation::Identity,
        addend,
    };
    gemv::gemv(
        OP,
        &device,
        gemv::Product {
            x,
            w,
            second: Some(second),
            bias,
            epilogue,
            sizes: (m, n, k),
            dims: &dims,
        },
    )
}

/// `out[i] = a[i] · b[i]` for every batch entry: `a` is `[batch, m, k]`, `b` `[batch, k, n]`,
/// the result `[batch, m, n]`, all one dtype (f32, f16 or bf16).
pub fn matmul_strided_batched(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "matmul_strided_batched";
    let device = common_device(OP, &[("a", a), ("b", b)])?;
    expect_dtype(OP, "a", a, &FLOAT_DTYPES)?;
    expect_same_dtype(OP, "b", b, "a", a.dtype())?;
    let [batch, m, k] = dims_of(OP, "a", a)?;
    let [b_batch, b_k, n] = dims_of(OP, "b", b)?;
    if (b_batch, b_k) != (batch, k) {
        return Err(Error::shape(
            OP,
            format!("a is {:?} but b is {:?}", a.dims(), b.dims()),
        ));
    }
    let dims = [batch, m, n];
    let mut out = alloc_output(OP, &device, a.dtype(), &dims)?;
    let stream = device.stream();
    if batch == 0 || m == 0 || n == 0 {
        return into_tensor(out, &dims);
    }
    if k == 0 {
        stream
            .memset_zeros(out.slice_mut())
            .map_err(|e| Error::cuda(OP, format!("zeroing the output: {e}")))?;
        return into_tensor(out, &dims);
    }

    let dtype = data_type(a.dtype()).ok_or_else(|| Error::dtype(OP, "a must be a float tensor"))?;
    let (m_arg, n_arg, k_arg) = (
        c_int_arg(OP, "m", m)?,
        c_int_arg(OP, "n", n)?,
        c_int_arg(OP, "k", k)?,
    );
    let batch_arg = c_int_arg(OP, "batch", batch)?;
    // Strides in elements; each fits since the whole tensor's element count does.
    let stride = |rows: usize, cols: usize| rows as c_longlong * cols as c_longlong;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let a_view = device_view(OP, "a", a)?;
    let b_view = device_view(OP, "b", b)?;
    let blas = handle(OP, &device)?;
    bind_context(OP, &device)?;
    let blas = blas.lock().unwrap_or_else(PoisonError::into_inner);
    {
        let (a_ptr, _a_sync) = a_view.device_ptr(stream);
        let (b_ptr, _b_sync) = b_view.device_ptr(stream);
        let out_slice = out.slice_mut();
        let (out_ptr, _out_sync) = out_slice.device_ptr_mut(stream);
        // Column-major: outᵀ [n, m] = (b as col-major [n, k]) · (a as col-major [k, m]).
        // SAFETY: a, b and out hold batch x (m x k), (k x n) and (m x n) elements of `dtype` at
        // the given strides, as checked above; leading dimensions are the row lengths n, k, n;
        // alpha and beta are host f32 values; the handle is used under its lock.
        unsafe {
            cublas::gemm_strided_batched_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n_arg,
                m_arg,
                k_arg,
                (&alpha as *const f32).cast::<c_void>(),
                b_ptr as *const c_void,
                dtype,
                n_arg,
                stride(k, n),
                a_ptr as *const c_void,
                dtype,
                k_arg,
                stride(m, k),
                (&beta as *const f32).cast::<c_void>(),
                out_ptr as *mut c_void,
                dtype,
                n_arg,
                stride(m, n),
                batch_arg,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            Error::cuda(
                OP,
                format!("cublasGemmStridedBatchedEx {batch} x ({m} x {k}) · ({k} x {n}): {e}"),
            )
        })?;
    }
    drop(blas);
    into_tensor(out, &dims)
}
