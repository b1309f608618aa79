//! Tensor shapes.

use std::fmt;

/// The size of each dimension of a tensor, outermost first (row-major).
///
/// A rank-0 shape (`[]`) is a scalar with one element.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// The size of each dimension.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The number of elements: the product of the dimensions (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Element strides of a dense row-major tensor of this shape: the last
    /// dimension has stride 1, each earlier one the product of those after it.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.0.len()];
        let mut acc = 1;
        for (stride, &dim) in strides.iter_mut().zip(&self.0).rev() {
            *stride = acc;
            acc *= dim;
        }
        strides
    }

    /// The element count, or `None` if the product overflows `usize`.
    pub fn checked_elem_count(&self) -> Option<usize> {
        self.0.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// Consumes the shape, returning its dimensions.
    pub fn into_dims(self) -> Vec<usize> {
        self.0
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(dims: Vec<usize>) -> Self {
        Shape(dims)
    }
}

impl From<&[usize]> for Shape {
    fn from(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
}

impl From<&Vec<usize>> for Shape {
    fn from(dims: &Vec<usize>) -> Self {
        Shape(dims.clone())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(dims: [usize; N]) -> Self {
        Shape(dims.to_vec())
    }
}

impl<const N: usize> From<&[usize; N]> for Shape {
    fn from(dims: &[usize; N]) -> Self {
        Shape(dims.to_vec())
    }
}

/// A one-dimensional shape of `n` elements.
impl From<usize> for Shape {
    fn from(n: usize) -> Self {
        Shape(vec![n])
    }
}

/// A scalar.
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(Vec::new())
    }
}

impl From<&Shape> for Shape {
    fn from(shape: &Shape) -> Self {
        shape.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_strides() {
        let s = Shape::from([2, 3, 4]);
        assert_eq!(s.rank(), 3);
        assert_eq!(s.elem_count(), 24);
        assert_eq!(s.contiguous_strides(), vec![12, 4, 1]);
        assert_eq!(Shape::from(()).elem_count(), 1);
        assert_eq!(Shape::from(5).dims(), &[5]);
        assert_eq!(Shape::from([usize::MAX, 2]).checked_elem_count(), None);
        assert_eq!(s.to_string(), "[2, 3, 4]");
    }
}
