# Prompts as token ids (`TokensPrompt`) and as text (`TextPrompt`), as vLLM's docs write them;
# only the import lines differ (and the model).

from zllm import LLM, SamplingParams
from zllm.inputs import TextPrompt, TokensPrompt

prompts = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
]


def main():
    llm = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = llm.get_tokenizer()
    sampling_params = SamplingParams(temperature=0, max_tokens=12)

    token_prompts = [TokensPrompt(prompt_token_ids=tokenizer.encode(p)) for p in prompts]
    text_prompts = [TextPrompt(prompt=p) for p in prompts]

    token_outputs = llm.generate(token_prompts, sampling_params)
    text_outputs = llm.generate(text_prompts, sampling_params)
    for from_ids, from_text in zip(token_outputs, text_outputs):
        print(f"Prompt token ids: {from_ids.prompt_token_ids}")
        print(f"From token ids: {from_ids.outputs[0].text!r}")
        print(f"From text: {from_text.outputs[0].text!r}")


if __name__ == "__main__":
    main()
