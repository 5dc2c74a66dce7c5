# Logprobs of generated and prompt tokens, as a vLLM script reads them; only the import lines
# differ (and the model).

from zllm import LLM, SamplingParams


def main():
    llm = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    sampling_params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    outputs = llm.generate(["The capital of France is"], sampling_params)
    for output in outputs:
        completion = output.outputs[0]
        print(f"Generated text: {completion.text!r}")
        print(f"Cumulative logprob: {completion.cumulative_logprob:.6f}")
        for token_id, logprobs in zip(completion.token_ids, completion.logprobs):
            chosen = logprobs[token_id]
            top = sorted(logprobs.values(), key=lambda lp: lp.rank)
            print(
                f"Token {token_id} {chosen.decoded_token!r} logprob={chosen.logprob:.6f} "
                f"rank={chosen.rank} top={[(lp.decoded_token, round(lp.logprob, 6)) for lp in top]}"
            )
        # The first prompt token has no logprob: nothing comes before it.
        for token_id, logprobs in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
            print(f"Prompt token {token_id} logprob={logprobs[token_id].logprob:.6f}")


if __name__ == "__main__":
    main()
