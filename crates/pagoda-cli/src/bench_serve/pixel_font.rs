//! A 5x7 pixel font for the labels of the benchmark plots. plotters draws text only through
//! system fonts (its `ttf` feature, which needs fontconfig and freetype); these glyphs keep the
//! PNGs readable on any machine with no font installed. Upper case, digits and the punctuation
//! that axis labels use; lower case letters are drawn as upper case.

use plotters::prelude::*;

/// Pixels per glyph row, and per glyph column (a glyph is `WIDTH` columns plus one of space).
const HEIGHT: i32 = 7;
const WIDTH: i32 = 5;

/// Each glyph is 7 rows, top first; bit 4 of a row is its leftmost pixel.
#[rustfmt::skip]
const GLYPHS: &[(char, [u8; 7])] = &[
    ('0', [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110]),
    ('1', [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('2', [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111]),
    ('3', [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110]),
    ('4', [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010]),
    ('5', [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110]),
    ('6', [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110]),
    ('7', [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000]),
    ('8', [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110]),
    ('9', [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100]),
    ('A', [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001]),
    ('B', [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110]),
    ('C', [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110]),
    ('D', [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100]),
    ('E', [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111]),
    ('F', [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000]),
    ('G', [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111]),
    ('H', [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001]),
    ('I', [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('J', [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100]),
    ('K', [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001]),
    ('L', [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111]),
    ('M', [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001]),
    ('N', [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001]),
    ('O', [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('P', [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000]),
    ('Q', [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101]),
    ('R', [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001]),
    ('S', [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110]),
    ('T', [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100]),
    ('U', [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('V', [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100]),
    ('W', [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010]),
    ('X', [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001]),
    ('Y', [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100]),
    ('Z', [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111]),
    (' ', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000]),
    ('.', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100]),
    (',', [0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000]),
    (':', [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000]),
    ('-', [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000]),
    ('+', [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000]),
    ('=', [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000]),
    ('/', [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000]),
    ('(', [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010]),
    (')', [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000]),
    ('%', [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011]),
    ('_', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111]),
];

/// Where a label sits relative to the point it is drawn at.
#[derive(Clone, Copy, Debug)]
pub enum Anchor {
    /// The point is the label's top-left corner.
    TopLeft,
    /// The point is the middle of the label's top edge.
    TopCenter,
    /// The point is the middle of the label's right edge.
    MiddleRight,
}

/// The rows of `c`; an unknown character draws as a filled box, so it is seen and fixed.
fn glyph(c: char) -> [u8; 7] {
    let upper = c.to_ascii_uppercase();
    GLYPHS
        .iter()
        .find(|(g, _)| *g == upper)
        .map_or([0b11111; 7], |(_, rows)| *rows)
}

/// Width and height in pixels of `text` drawn at `scale`.
pub fn size(text: &str, scale: i32) -> (i32, i32) {
    let chars = text.chars().count() as i32;
    let width = (chars * (WIDTH + 1) - 1).max(0) * scale;
    (width, HEIGHT * scale)
}

/// Draws `text` onto `area` (pixel coordinates) at `scale` pixels per font pixel.
pub fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    at: (i32, i32),
    anchor: Anchor,
    scale: i32,
    color: &RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (width, height) = size(text, scale);
    let (x0, y0) = match anchor {
        Anchor::TopLeft => at,
        Anchor::TopCenter => (at.0 - width / 2, at.1),
        Anchor::MiddleRight => (at.0 - width, at.1 - height / 2),
    };
    for (i, c) in text.chars().enumerate() {
        let left = x0 + i as i32 * (WIDTH + 1) * scale;
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..WIDTH {
                if bits & (1 << (WIDTH - 1 - col)) != 0 {
                    let x = left + col * scale;
                    let y = y0 + row as i32 * scale;
                    area.draw(&Rectangle::new(
                        [(x, y), (x + scale - 1, y + scale - 1)],
                        color.filled(),
                    ))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_glyph_fits_five_columns_and_is_listed_once() {
        for (i, (c, rows)) in GLYPHS.iter().enumerate() {
            assert!(
                rows.iter().all(|&r| r < 1 << WIDTH),
                "{c:?} is wider than 5"
            );
            assert!(
                GLYPHS[i + 1..].iter().all(|(other, _)| other != c),
                "{c:?} listed twice"
            );
        }
        assert_eq!(glyph('m'), glyph('M'));
        assert_eq!(glyph('~'), [0b11111; 7]);
    }

    #[test]
    fn sizes_count_the_space_between_glyphs() {
        assert_eq!(size("", 2), (0, 14));
        assert_eq!(size("1", 2), (10, 14));
        assert_eq!(size("10", 1), (11, 7));
    }
}
