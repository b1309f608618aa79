//! Generates a continuation of a prompt, streaming it: `generate MODEL PROMPT`.

use pagoda_engine::{Engine, Prompt, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        return Err("usage: generate MODEL PROMPT".into());
    };
    let mut engine = Engine::builder().model(model).build()?;
    engine.add_request(Prompt::Text(prompt), SamplingParams::greedy(64))?;
    while engine.has_unfinished() {
        for output in engine.step()? {
            print!("{}", output.text_delta);
            if let Some(reason) = output.finish_reason {
                eprintln!("\n{} tokens, {}", output.completion_tokens, reason.as_str());
            }
        }
    }
    Ok(())
}
