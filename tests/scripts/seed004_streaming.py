"""Seed 004's AsyncLLM streaming example, written for zllm: only the imports and the model
path differ from the vLLM original. `python seed004_streaming.py MODEL_PATH`.

It prints each prompt's DELTA stream; the test checks the pieces against a FINAL_ONLY run
with the same seed.
"""

import asyncio
import json
import sys

from zllm import AsyncEngineArgs, AsyncLLM, RequestOutputKind, SamplingParams

MODEL = sys.argv[1]
STREAMED: dict[str, str] = {}


async def stream_response(engine: AsyncLLM, prompt: str, request_id: str) -> None:
    """
    Stream response from AsyncLLM and display tokens as they arrive.
    """
    print(f"\nPrompt: {prompt!r}")
    print("Response: ", end="", flush=True)

    # Configure sampling parameters for streaming
    sampling_params = SamplingParams(
        max_tokens=100,
        temperature=0.8,
        top_p=0.95,
        seed=42,  # For reproducible results
        output_kind=RequestOutputKind.DELTA,  # Get only new tokens each iteration
    )

    try:
        # Stream tokens from AsyncLLM
        async for output in engine.generate(
            request_id=request_id, prompt=prompt, sampling_params=sampling_params
        ):
            # Process each completion in the output
            for completion in output.outputs:
                # In DELTA mode, we get only new tokens generated since last iteration
                new_text = completion.text
                if new_text:
                    print(new_text, end="", flush=True)
                    STREAMED[prompt] = STREAMED.get(prompt, "") + new_text

            # Check if generation is finished
            if output.finished:
                print("\nGeneration complete!")
                break

    except Exception as e:
        print(f"\nError during streaming: {e}")
        raise


async def final_texts(engine: AsyncLLM, prompts: list[str]) -> dict[str, str]:
    """The same requests in FINAL_ONLY mode: what the streamed pieces must add up to."""
    params = SamplingParams(
        max_tokens=100,
        temperature=0.8,
        top_p=0.95,
        seed=42,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    texts = {}
    for i, prompt in enumerate(prompts):
        async for output in engine.generate(prompt, params, f"final-{i}"):
            texts[prompt] = output.outputs[0].text
    return texts


async def main():
    print("Initializing AsyncLLM...")

    # Create AsyncLLM engine with simple configuration
    engine_args = AsyncEngineArgs(
        model=MODEL,
        enforce_eager=True,  # Faster startup for examples
    )
    engine = AsyncLLM.from_engine_args(engine_args)

    try:
        # Example prompts to demonstrate streaming
        prompts = [
            "The future of artificial intelligence is",
            "In a galaxy far, far away",
            "The key to happiness is",
        ]

        print(f"Running {len(prompts)} streaming examples...")

        # Process each prompt
        for i, prompt in enumerate(prompts, 1):
            print(f"\n{'=' * 60}")
            print(f"Example {i}/{len(prompts)}")
            print(f"{'=' * 60}")

            request_id = f"stream-example-{i}"
            await stream_response(engine, prompt, request_id)

            # Brief pause between examples
            if i < len(prompts):
                await asyncio.sleep(0.5)

        print("\nAll streaming examples completed!")
        final = await final_texts(engine, prompts)
        print("RESULT " + json.dumps({"streamed": STREAMED, "final": final}))

    finally:
        # Always clean up the engine
        print("Shutting down engine...")
        engine.shutdown()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("\nInterrupted by user")
