//! Link-preview images: a neuron's card as a 1200 × 630 PNG (the size Open Graph and Twitter
//! cards show), drawn with plotters on a bitmap and encoded with `png`. The font (DejaVu Sans,
//! free licence, see `assets/DejaVuSans.LICENSE`) is compiled in, so the image is the same on any
//! machine and needs no system fonts.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 630;

fn font_ready() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other("the card font could not be loaded").into())
    }
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    std::io::Error::other(format!("drawing the card: {e}")).into()
}

/// A card: a title, a subtitle, and up to ten labelled bars (`(label, value)`, the largest
/// first), as PNG bytes.
pub fn bars_png(title: &str, subtitle: &str, bars: &[(String, f32)]) -> Result<Vec<u8>> {
    font_ready()?;
    let (w, h) = (WIDTH as i32, HEIGHT as i32);
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&RGBColor(248, 249, 251)).map_err(draw_err)?;
        root.draw(&Rectangle::new([(0, 0), (w, 12)], RGBColor(29, 35, 48).filled())).map_err(draw_err)?;
        let ink = RGBColor(29, 35, 48);
        root.draw_text(title, &("sans-serif", 58).into_font().color(&ink), (48, 40)).map_err(draw_err)?;
        root.draw_text(subtitle, &("sans-serif", 28).into_font().color(&RGBColor(90, 98, 112)), (50, 112)).map_err(draw_err)?;
        let bars = &bars[..bars.len().min(10)];
        let max = bars.iter().map(|b| b.1).fold(f32::MIN_POSITIVE, f32::max);
        let (x0, x1, top, row) = (330, w - 150, 175, 42);
        let label = ("sans-serif", 30).into_font().color(&ink).pos(Pos::new(HPos::Right, VPos::Center));
        let value = ("sans-serif", 24).into_font().color(&RGBColor(90, 98, 112)).pos(Pos::new(HPos::Left, VPos::Center));
        for (i, (text, v)) in bars.iter().enumerate() {
            let y = top + i as i32 * row;
            let len = ((v / max).clamp(0.0, 1.0) * (x1 - x0) as f32) as i32;
            root.draw(&Rectangle::new([(x0, y + 6), (x0 + len.max(2), y + row - 6)], RGBColor(216, 87, 42).filled())).map_err(draw_err)?;
            root.draw_text(&format!("“{}”", shorten(text, 22)), &label, (x0 - 16, y + row / 2)).map_err(draw_err)?;
            root.draw_text(&format!("{v:.2}"), &value, (x0 + len.max(2) + 10, y + row / 2)).map_err(draw_err)?;
        }
        root.draw_text("Flash Interp", &("sans-serif", 24).into_font().color(&RGBColor(90, 98, 112)), (w - 200, h - 44)).map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    let mut out = Vec::with_capacity(64 << 10);
    {
        let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(draw_err)?;
        writer.write_image_data(&rgb).map_err(draw_err)?;
    }
    Ok(out)
}

/// `s`, or its first `n - 1` characters and an ellipsis when it is longer than `n`.
pub(crate) fn shorten(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_is_a_png_of_the_card_size_with_ink_where_the_bars_are() {
        let bars: Vec<(String, f32)> = vec![(" dog".into(), 4.0), ("Dog".into(), 2.0), ("a very long token that gets cut".into(), 0.5)];
        let png_bytes = bars_png("Neuron 29:808", "SmolLM2 · up view · neg", &bars).unwrap();
        let dec = png::Decoder::new(&png_bytes[..]);
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        let px = |x: u32, y: u32| {
            let i = ((y * WIDTH + x) * 3) as usize;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        // The first bar is full length (orange), the second half as long: at 3/4 of the width
        // the first row is orange and the second is background.
        let x = 330 + (1050 - 330) * 3 / 4;
        assert_eq!(px(x, 175 + 21), (216, 87, 42));
        assert_eq!(px(x, 175 + 42 + 21), (248, 249, 251));
        // Text was drawn: the title area has dark pixels.
        assert!((48..600).any(|x| (40..100).any(|y| px(x, y).0 < 100)));
    }
}
