//! `pagoda chat`: an interactive conversation in the terminal. Each turn is rendered with the
//! model's chat template over the whole history, and the reply streams as it is generated.

use std::io::{BufRead, Write};

use clap::Args;
use pagoda_engine::{ChatMessage, EngineHandle, FinishReason, Prompt, SamplingParams};

use crate::serve::EngineArgs;

type BoxError = Box<dyn std::error::Error>;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply (fewer when the context runs short).
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (1 = off).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler; by default a fresh one per reply.
    #[arg(long)]
    seed: Option<u64>,
}

const HELP: &str = "/reset starts over, /exit (or Ctrl-D) leaves";

pub fn run(args: ChatArgs) -> Result<(), BoxError> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..SamplingParams::default()
    };
    params.validate()?;
    let handle = args.engine.load()?.spawn();
    eprintln!("chatting with {}; {HELP}", handle.model_name());
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|system| ChatMessage::new("system", system.as_str()))
        .collect();
    let result = converse(&handle, &opening, &params);
    handle.shutdown();
    result
}

/// Reads turns from stdin until it ends or the user leaves.
fn converse(
    handle: &EngineHandle,
    opening: &[ChatMessage],
    params: &SamplingParams,
) -> Result<(), BoxError> {
    let mut history = opening.to_vec();
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout();
    loop {
        write!(stdout, "> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            writeln!(stdout)?;
            return Ok(());
        }
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history = opening.to_vec();
                eprintln!("(conversation cleared)");
                continue;
            }
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new(
            "user",
            line.trim_end_matches(['\n', '\r']),
        ));
        match reply(handle, &history, params, &mut stdout) {
            Ok(text) => history.push(ChatMessage::new("assistant", text)),
            Err(e) => {
                // The turn did not happen; the user may rephrase or /reset.
                history.pop();
                eprintln!("error: {e}");
            }
        }
    }
}

/// Streams the model's reply to `history` to `out` and returns it.
fn reply(
    handle: &EngineHandle,
    history: &[ChatMessage],
    params: &SamplingParams,
    out: &mut impl Write,
) -> Result<String, BoxError> {
    let prompt = Prompt::Chat(history.to_vec());
    let used = handle.count_tokens(&prompt)?;
    let context = handle.max_context_tokens();
    let room = context.saturating_sub(used);
    if room == 0 {
        return Err(format!(
            "the conversation has filled the context of {context} tokens; /reset to start over"
        )
        .into());
    }
    let params = SamplingParams {
        max_tokens: params.max_tokens.min(room),
        ..params.clone()
    };
    let mut stream = handle.submit(prompt, params.clone())?;
    let mut text = String::new();
    let mut finish = None;
    while let Some(output) = stream.recv() {
        write!(out, "{}", output.text_delta)?;
        out.flush()?;
        text.push_str(&output.text_delta);
        if output.finish_reason.is_some() {
            finish = output.finish_reason;
            break;
        }
    }
    writeln!(out)?;
    match finish {
        Some(FinishReason::Stop) => {}
        Some(FinishReason::Length) => eprintln!("(reply cut at {} tokens)", params.max_tokens),
        Some(FinishReason::Abort) | None => {
            return Err("the engine stopped generating this reply".into());
        }
    }
    Ok(text)
}
