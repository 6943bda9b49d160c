"""Chat through llama.cpp's own chat completion on an exported GGUF: does it build the prompt exactly as the
tokenizer's chat template does in transformers, and does it stop at the model's end-of-turn token?

Part of `make check-runtimes` (benchmarks/runtimes.py calls `check_chat`). 20 multi-turn conversations, each
ending on a user turn; llama-cpp-python renders the GGUF's embedded `tokenizer.chat_template` (no chat_format
given) and answers greedily; loratune's reference is the same model in transformers, greedy until the
end-of-turn token. An f32 export must give the same prompt ids, the same answer, and stop where loratune stops.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ANSWER_TOKENS = 48
FIRST = ["What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis briefly.",
         "List three uses of a paperclip.", "What does a compiler do?", "Give me a tip for better sleep.",
         "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What is 12 times 7?",
         "Describe a cat in one sentence."]
FOLLOW_UPS = ["Can you say that in fewer words?", "Thanks! One more example, please."]


def conversations() -> list[list[dict[str, str]]]:
    """20 three-turn conversations (user, assistant, user), with and without a system turn."""
    chats = []
    for i, question in enumerate(FIRST):
        for j, follow_up in enumerate(FOLLOW_UPS):
            chat = [{"role": "user", "content": question}, {"role": "assistant", "content": "Let me think."},
                    {"role": "user", "content": follow_up}]
            if (i + j) % 2:
                chat.insert(0, {"role": "system", "content": "You answer in one short sentence."})
            chats.append(chat)
    return chats


def reference_answer(model, prompt: list[int], end_of_turn: int) -> list[int]:
    """transformers' greedy answer, ending with the end-of-turn token when the model emits it in time."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(ANSWER_TOKENS):
            token = int(torch.argmax(out.logits[0, -1]))
            tokens.append(token)
            if token == end_of_turn:
                break
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def check_chat(model, tokenizer, gguf_path: Path) -> dict:
    """Compare prompt ids, answers and stops; `model` is the adapted model the GGUF was exported from."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from loratune.export.modelfile import end_of_turn_id

    end_of_turn = end_of_turn_id(tokenizer)
    llm = Llama(model_path=str(gguf_path), n_ctx=512, n_threads=os.cpu_count(), seed=0, verbose=False)
    eot_in_gguf = llm.metadata.get("tokenizer.ggml.eot_token_id")
    try:
        template = llm.metadata["tokenizer.chat_template"]
        formatter = Jinja2ChatFormatter(template=template, eos_token=llm._model.token_get_text(llm.token_eos()),
                                        bos_token=llm._model.token_get_text(llm.token_bos()))
        rows = []
        for chat in conversations():
            expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            rendered = formatter(messages=chat)
            prompt = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
            answer = reference_answer(model, expected, end_of_turn)
            reply = llm.create_chat_completion(messages=chat, max_tokens=ANSWER_TOKENS, temperature=0.0, seed=0)
            choice = reply["choices"][0]
            stopped = answer[-1] == end_of_turn
            text = tokenizer.decode(answer[:-1] if stopped else answer, skip_special_tokens=True)
            rows.append({"prompt_ids_equal": prompt == expected, "answer_equal": choice["message"]["content"] == text,
                         "stopped_at_end_of_turn": (choice["finish_reason"] == "stop") == stopped,
                         "loratune_stopped": stopped})
    finally:
        llm.close()
    summary = {key: sum(row[key] for row in rows) for key in rows[0]}
    print(f"chat     {len(rows)} conversations through llama.cpp's chat completion: prompt ids equal "
          f"{summary['prompt_ids_equal']}/{len(rows)}, answers equal {summary['answer_equal']}/{len(rows)}, "
          f"stop agrees {summary['stopped_at_end_of_turn']}/{len(rows)} (loratune ended {summary['loratune_stopped']} "
          f"at the end-of-turn token within {ANSWER_TOKENS} tokens)", flush=True)
    return {"conversations": len(rows), **summary, "end_of_turn_id": end_of_turn,
            "eot_in_gguf": eot_in_gguf}


def chat_failures(row: dict) -> list[str]:
    """Every conversation must agree; at least one answer must end at the end-of-turn token, or the stop is
    untested."""
    n = row["conversations"]
    problems = [f"chat: {key} in {row[key]}/{n} conversations" for key in
                ("prompt_ids_equal", "answer_equal", "stopped_at_end_of_turn") if row[key] != n]
    if row["loratune_stopped"] == 0:
        problems.append(f"chat: no answer reached the end-of-turn token within {ANSWER_TOKENS} tokens")
    return problems
