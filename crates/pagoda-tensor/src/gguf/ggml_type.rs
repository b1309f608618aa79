//! ggml's tensor encodings.

use std::fmt;

/// How a GGUF tensor's elements are encoded.
///
/// The types this crate dequantizes have their own variants; every other
/// ggml type is kept by id so that errors can name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: an f16 scale `d` and 32 `i8` values `q`; value `q * d`.
    Q8_0,
    /// Blocks of 32: an f16 scale `d` and 16 bytes of 4-bit `q`; value `(q - 8) * d`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit `q`; value `q * d + m`.
    Q4_1,
    /// Any other ggml type, by its id.
    Other(u32),
}

/// Names, block sizes (elements) and block byte sizes of ggml types by id,
/// from ggml's `ggml_type` enum and type traits (ggml/include/ggml.h,
/// ggml/src/ggml.c). Ids 4, 5 and 31..=33 belong to removed types.
const TYPE_TABLE: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// The type with ggml id `id`.
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    fn table_entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        let id = self.id();
        TYPE_TABLE.iter().find(|entry| entry.0 == id)
    }

    /// ggml's name for the type (`"Q4_K"`), or `None` for an unknown id.
    pub fn name(self) -> Option<&'static str> {
        self.table_entry().map(|entry| entry.1)
    }

    /// Elements per block and bytes per block, or `None` for an unknown id.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        self.table_entry().map(|entry| (entry.2, entry.3))
    }

    /// Whether this crate can dequantize the type.
    pub fn is_supported(self) -> bool {
        !matches!(self, GgmlType::Other(_))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown ggml type {}", self.id()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_name() {
        for entry in TYPE_TABLE {
            let ty = GgmlType::from_id(entry.0);
            assert_eq!(ty.id(), entry.0);
            assert_eq!(ty.to_string(), entry.1);
        }
        assert_eq!(GgmlType::from_id(12).to_string(), "Q4_K");
        assert_eq!(GgmlType::from_id(12), GgmlType::Other(12));
        assert_eq!(GgmlType::Other(99).to_string(), "unknown ggml type 99");
        assert_eq!(GgmlType::Q8_0.block_layout(), Some((32, 34)));
        assert_eq!(GgmlType::Q4_1.block_layout(), Some((32, 20)));
    }
}
