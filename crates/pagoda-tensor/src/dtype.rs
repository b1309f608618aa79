//! Element types a tensor can hold.

use std::fmt;

use half::{bf16, f16};

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: f32's exponent with a 7-bit mantissa.
    BF16,
    /// Unsigned byte (token ids of small vocabularies, packed quantized data).
    U8,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer (token ids, block tables).
    U32,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::U8,
        DType::I32,
        DType::U32,
    ];

    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// Lower-case name: `"f32"`, `"f16"`, `"bf16"`, `"u8"`, `"i32"`, `"u32"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::U32 => "u32",
        }
    }

    /// Whether the dtype is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that is the in-memory representation of a [`DType`].
pub trait Element: bytemuck::Pod + Copy + Send + Sync + fmt::Debug + 'static {
    /// The dtype this type represents.
    const DTYPE: DType;

    /// Converts to `f32` (rounding integers beyond 2^24).
    fn to_f32(self) -> f32;

    /// Converts from `f32`; integer types round toward zero and saturate, NaN becomes 0.
    fn from_f32(v: f32) -> Self;

    /// Converts to `f64`, exactly for every dtype of this crate.
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }

    /// Converts from `f64`; integer types round toward zero and saturate, NaN becomes 0.
    fn from_f64(v: f64) -> Self {
        Self::from_f32(v as f32)
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
}

/// Integer elements convert with Rust's `as`, which truncates toward zero,
/// saturates at the type's bounds and maps NaN to 0.
macro_rules! int_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                f64::from(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}

int_element!(u8, DType::U8);
int_element!(i32, DType::I32);
int_element!(u32, DType::U32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(DType::F32.size_in_bytes(), std::mem::size_of::<f32>());
        assert_eq!(DType::BF16.size_in_bytes(), 2);
        assert_eq!(DType::U8.size_in_bytes(), 1);
        assert_eq!(DType::BF16.to_string(), "bf16");
        assert!(DType::F16.is_float());
        assert!(!DType::U32.is_float());
    }

    #[test]
    fn float_round_trips() {
        for v in [0.0f32, 1.0, -2.5, 0.099_975_586, 65504.0] {
            assert_eq!(f16::from_f32(v).to_f32(), v, "f16 {v}");
        }
        for v in [0.0f32, 1.0, -2.5, 2f32.powi(127), 0.0078125] {
            assert_eq!(<bf16 as Element>::from_f32(v).to_f32(), v, "bf16 {v}");
        }
        assert_eq!(<i32 as Element>::from_f32(-3.9), -3);
        assert_eq!(<u8 as Element>::from_f32(300.0), 255);
        assert_eq!(<u32 as Element>::from_f32(f32::NAN), 0);
        assert_eq!(<u32 as Element>::from_f64(u32::MAX.to_f64()), u32::MAX);
    }
}
