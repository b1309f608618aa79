//! Strided views: how a tensor's logical indices map onto its storage.

use crate::{Error, Result, Shape};

/// A shape, per-dimension strides and a starting offset, all in elements.
///
/// The element at logical index `[i0, i1, ...]` lives at storage position
/// `offset + i0 * strides[0] + i1 * strides[1] + ...`. Views (`narrow`,
/// `transpose`, `permute`) only change the layout, never the storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// The dense row-major layout of `shape`, starting at element `offset`.
    pub fn contiguous_with_offset(shape: impl Into<Shape>, offset: usize) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset,
        }
    }

    /// The dense row-major layout of `shape`, starting at element 0.
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        Self::contiguous_with_offset(shape, 0)
    }

    /// A layout with explicit strides; `strides` must have one entry per dimension.
    pub fn new(shape: impl Into<Shape>, strides: Vec<usize>, offset: usize) -> Result<Self> {
        let shape = shape.into();
        if strides.len() != shape.rank() {
            return Err(Error::ShapeMismatch {
                op: "Layout::new (strides vs dims)",
                lhs: shape,
                rhs: Shape::from(strides),
            });
        }
        Ok(Layout {
            shape,
            strides,
            offset,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The size of each dimension.
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    /// The stride of each dimension, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// The storage position of the first element, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    /// Whether the elements are dense and in row-major order, so that they
    /// occupy `offset..offset + elem_count` of the storage.
    ///
    /// Strides of dimensions of size 1 are ignored: they are never stepped.
    pub fn is_contiguous(&self) -> bool {
        if self.elem_count() == 0 {
            return true;
        }
        let mut expected = 1;
        for (&dim, &stride) in self.dims().iter().zip(&self.strides).rev() {
            if dim != 1 && stride != expected {
                return false;
            }
            expected *= dim;
        }
        true
    }

    /// The storage range `start..end` if the layout is contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous()
            .then(|| self.offset..self.offset + self.elem_count())
    }

    /// One past the highest storage position this layout touches (0 for an
    /// empty tensor, which touches nothing): the storage must hold at least
    /// this many elements.
    pub fn required_len(&self) -> usize {
        if self.elem_count() == 0 {
            return 0;
        }
        let last: usize = self
            .dims()
            .iter()
            .zip(&self.strides)
            .map(|(&d, &s)| (d - 1) * s)
            .sum();
        self.offset + last + 1
    }

    fn check_dim(&self, op: &'static str, dim: usize) -> Result<()> {
        if dim >= self.shape.rank() {
            return Err(Error::DimOutOfRange {
                op,
                dim,
                rank: self.shape.rank(),
            });
        }
        Ok(())
    }

    /// The view of `len` entries of dimension `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        self.check_dim("narrow", dim)?;
        let size = self.dims()[dim];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::NarrowOutOfRange {
                dim,
                start,
                len,
                size,
            });
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Layout {
            shape: Shape::from(dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        })
    }

    /// The view with dimensions `d0` and `d1` swapped.
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Layout> {
        self.check_dim("transpose", d0)?;
        self.check_dim("transpose", d1)?;
        let mut dims = self.dims().to_vec();
        let mut strides = self.strides.clone();
        dims.swap(d0, d1);
        strides.swap(d0, d1);
        Ok(Layout {
            shape: Shape::from(dims),
            strides,
            offset: self.offset,
        })
    }

    /// The view whose dimension `i` is this layout's dimension `order[i]`.
    pub fn permute(&self, order: &[usize]) -> Result<Layout> {
        let rank = self.shape.rank();
        let mut seen = vec![false; rank];
        let valid = order.len() == rank
            && order
                .iter()
                .all(|&d| d < rank && !std::mem::replace(&mut seen[d], true));
        if !valid {
            return Err(Error::InvalidPermutation {
                dims: order.to_vec(),
                rank,
            });
        }
        Ok(Layout {
            shape: Shape::from(order.iter().map(|&d| self.dims()[d]).collect::<Vec<_>>()),
            strides: order.iter().map(|&d| self.strides[d]).collect(),
            offset: self.offset,
        })
    }

    /// The same elements under a new shape with the same element count.
    ///
    /// Only contiguous layouts can be reshaped as a view; call `contiguous`
    /// on the tensor first otherwise.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Layout> {
        let shape = shape.into();
        if shape.checked_elem_count() != Some(self.elem_count()) {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs: self.shape.clone(),
                rhs: shape,
            });
        }
        if !self.is_contiguous() {
            return Err(Error::NotContiguous { op: "reshape" });
        }
        Ok(Layout::contiguous_with_offset(shape, self.offset))
    }

    /// The storage runs that hold the elements, in row-major logical order:
    /// each item is the start of a run of [`StridedBlocks::block_len`] consecutive elements.
    pub fn strided_blocks(&self) -> StridedBlocks {
        StridedBlocks::new(self)
    }

    /// The storage position of every element, in row-major logical order.
    pub fn strided_index(&self) -> impl Iterator<Item = usize> + '_ {
        let blocks = self.strided_blocks();
        let block_len = blocks.block_len();
        blocks.flat_map(move |start| start..start + block_len)
    }
}

/// Iterator over the starts of the contiguous runs of a [`Layout`].
///
/// The trailing dimensions that are laid out densely are merged into one run,
/// so a contiguous layout yields a single run and a transposed matrix yields
/// one run per element.
#[derive(Clone, Debug)]
pub struct StridedBlocks {
    /// Sizes and strides of the outer dimensions that are stepped one by one.
    outer_dims: Vec<usize>,
    outer_strides: Vec<usize>,
    index: Vec<usize>,
    next: Option<usize>,
    block_len: usize,
}

impl StridedBlocks {
    fn new(layout: &Layout) -> Self {
        let dims = layout.dims();
        let strides = layout.strides();
        let mut block_len = 1;
        let mut inner = dims.len();
        while inner > 0 {
            let d = inner - 1;
            if dims[d] != 1 && strides[d] != block_len {
                break;
            }
            block_len *= dims[d];
            inner = d;
        }
        let next = (layout.elem_count() > 0).then_some(layout.offset());
        StridedBlocks {
            outer_dims: dims[..inner].to_vec(),
            outer_strides: strides[..inner].to_vec(),
            index: vec![0; inner],
            next,
            block_len,
        }
    }

    /// Number of consecutive storage elements in each run.
    pub fn block_len(&self) -> usize {
        self.block_len
    }
}

impl Iterator for StridedBlocks {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        // Advance the outer multi-index like an odometer, last dimension fastest.
        let mut next = current;
        let mut carried_out = true;
        for d in (0..self.outer_dims.len()).rev() {
            self.index[d] += 1;
            next += self.outer_strides[d];
            if self.index[d] < self.outer_dims[d] {
                carried_out = false;
                break;
            }
            next -= self.index[d] * self.outer_strides[d];
            self.index[d] = 0;
        }
        self.next = (!carried_out).then_some(next);
        Some(current)
    }
}
