"""GrammarCheck: structured-output specs are compiled where requests enter, so a bad one is refused there.

A spec that does not compile raises GrammarError (a ValueError: HTTP 400, gRPC INVALID_ARGUMENT) naming the
problem; one whose compilation takes longer than `timeout_s` is refused the same way, and the engine never
sees it. Compilation runs on a worker thread, off the event loop. The compiled grammars are cached here
too, so a spec that passed once is checked again for free; the engine core compiles its own copy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.structured_output.compiler import GrammarCompiler, GrammarError
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

DEFAULT_TIMEOUT_S = 10.0


class GrammarCheck:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"the grammar compile timeout must be positive, got {timeout_s}")
        self.compiler = GrammarCompiler(tokenizer, vocab_size, tokenizer.eos_token_ids)
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="grammar-check")

    async def check(self, spec: StructuredOutputsParams | None) -> None:
        """Return when `spec` compiles (or is None); GrammarError if it does not, or not within the timeout."""
        if spec is None or self.compiler.cached(spec) is not None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, lambda: self.compiler.llg_tokenizer)  # once, not timed
        try:
            await asyncio.wait_for(loop.run_in_executor(self._pool, self.compiler.compile, spec), self.timeout_s)
        except TimeoutError:
            kind = "json_object" if spec.json_object else spec.key[0]
            raise GrammarError(f"structured_outputs.{kind}: compiling it took longer than the server's limit "
                               f"of {self.timeout_s:g} s; simplify it") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
