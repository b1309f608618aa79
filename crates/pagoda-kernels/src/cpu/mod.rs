//! CPU implementations of every op, parallel with rayon where it pays.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod kv_write;
pub mod nf4;
pub mod norm;
pub mod rope;
pub mod sampling;
pub mod softmax;
