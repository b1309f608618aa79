//! Generates a continuation of a prompt: `generate MODEL PROMPT`.

use pagoda_engine::{Engine, GenerationParams, Prompt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        return Err("usage: generate MODEL PROMPT".into());
    };
    let mut engine = Engine::builder().model(model).build()?;
    let params = GenerationParams {
        max_tokens: 64,
        ..Default::default()
    };
    let out = engine.generate_stream(&Prompt::Text(prompt), &params, |text| {
        print!("{text}");
        Ok(())
    })?;
    eprintln!("\n{} tokens, {:?}", out.token_ids.len(), out.finish_reason);
    Ok(())
}
