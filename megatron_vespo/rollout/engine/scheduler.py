"""The scheduler thread of the local engine: continuous batching, the model forward, and finishing
requests (which answers their callers).

The scheduler prefills every waiting request (up to ``max_batch``) together and decodes one token
per step for the whole batch; at each step boundary, waiting requests are prefilled on their own
and merged into the running batch's cache, unless the engine is paused or a weight update waits
for the batch to drain. Model calls run outside the engine lock, under ``_model_lock`` (which
weight writes take too), so queueing and abort do not wait for a forward.
"""

from __future__ import annotations

import logging
import time

import torch

from megatron_vespo.rollout import protocol
from megatron_vespo.rollout.engine import answers, sampler
from megatron_vespo.rollout.engine.requests import Request
from megatron_vespo.rollout.engine.running_batch import RunningBatch, joinable, left_padded

# the engine's logger, whichever of its parts logs (the name it has always had)
log = logging.getLogger("megatron_vespo.rollout.local_engine")


class Scheduler:
    """The scheduler half of ``LocalEngine``. A mixin: it shares the engine's state, all set by
    ``LocalEngine.__init__``: ``_cond`` (over ``_lock``) guards the queue (``_waiting``,
    ``_running``, ``_by_rid``) and the flags (``_paused``, ``_pause_mode``, ``_parked``,
    ``_updates_pending``, ``_closed``); ``_model_lock`` serialises forwards with weight writes."""

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._waiting or self._updates_pending):
                    self._cond.wait()
                if self._closed:
                    return
            if self.batch_wait_s:
                time.sleep(self.batch_wait_s)  # let requests sent together by separate callers share the batch
            with self._cond:
                if self._paused or self._updates_pending or self._closed:
                    continue
                batch = []
                while self._waiting and len(batch) < self.max_batch:
                    r = self._waiting.popleft()
                    if not r.done:
                        batch.append(r)
                self._running = batch
            try:
                if batch:
                    self._run_batch(batch)
            except Exception as err:  # a model error must not kill the scheduler or hang callers
                log.exception("local engine batch failed")
                with self._cond:
                    for r in batch + self._running:  # the running list includes requests that joined later
                        self._finish(r, protocol.FinishReason(type="abort", status_code=500,
                                                              message=f"engine error: {type(err).__name__}: {err}"))
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()

    def _run_batch(self, pending: list[Request]) -> None:
        """Decode until every request is done. At each step boundary, waiting requests join the
        running batch (prefilled on their own, then merged into its cache) unless the engine is
        paused or a weight update waits for the batch to drain."""
        batch = RunningBatch()
        while True:
            if pending:
                batch.add(pending, *self._prefill(pending))
                pending = []
            picks = self._sample(batch.rows, batch.last)
            with self._cond:
                self._record(batch.rows, picks)
                self._hold_in_place(batch.rows)
                live = [i for i, r in enumerate(batch.rows) if not r.done]
                if self._paused and self._pause_mode == "retract":
                    self._waiting.extendleft(reversed([batch.rows[i] for i in live]))
                    return
                pending = self._joiners(batch, live)
                self._running = [batch.rows[i] for i in live] + pending
                if not live and not pending:
                    return
            if not live:  # everything finished; the new arrivals start a fresh batch
                batch = RunningBatch()
                continue
            if len(live) < len(batch.rows):
                batch.keep(live)
            self._decode(batch)

    # -- the steps of _run_batch; those named "under the lock" run inside its ``with self._cond``
    def _sample(self, rows: list[Request], last: torch.Tensor) -> list[tuple[int, float]]:
        """The batch's next tokens. Should the shared step fail, each row is drawn on its own (the
        same draw: every row has its own generator) and only the rows that fail again are aborted,
        so one bad request cannot abort the requests that share its batch."""
        try:
            return sampler.sample(rows, last, self.eos_token_ids)
        except Exception:
            log.exception("sampling the batch failed; sampling its %d rows one by one", len(rows))
        picks = []
        for i, r in enumerate(rows):
            try:
                picks += sampler.sample([r], last[i:i + 1], self.eos_token_ids)
            except Exception as err:
                with self._cond:
                    self._finish(r, protocol.FinishReason(type="abort", status_code=500,
                                                          message=f"sampling failed: {type(err).__name__}: {err}"))
                picks.append((0, 0.0))  # never recorded: the row is done
        return picks

    def _record(self, rows: list[Request], picks: list[tuple[int, float]]) -> None:
        """Under the lock: append each live row's sampled token and log-prob, finish those done."""
        for r, (token, logprob) in zip(rows, picks):
            if r.done:
                continue
            if r.sampling.max_new_tokens == 0:
                self._finish(r, protocol.FinishReason(type="length", length=0))
                continue
            r.output_ids.append(token)
            r.output_logprobs.append(logprob)
            finish = sampler.check_finish(r, token, self.eos_token_ids)
            if finish is not None:
                self._finish(r, finish)

    def _hold_in_place(self, rows: list[Request]) -> None:
        """Under the lock: hold the batch (with its KV cache) while paused in place; ``pause``
        returns once ``_parked`` says so."""
        while self._paused and self._pause_mode == "in_place" and not self._closed and any(
                not r.done for r in rows):
            self._parked = True
            self._cond.notify_all()
            self._cond.wait()
        self._parked = False

    def _joiners(self, batch: RunningBatch, live: list[int]) -> list[Request]:
        """Under the lock: the waiting requests that join the batch at this step boundary (none
        while paused, while a weight update waits, or when the cache cannot take rows)."""
        pending = []
        if not self._paused and not self._updates_pending and not self._closed and (
                not live or joinable(batch.cache)):
            while self._waiting and len(live) + len(pending) < self.max_batch:
                r = self._waiting.popleft()
                if not r.done:
                    pending.append(r)
        return pending

    def _decode(self, batch: RunningBatch) -> None:
        """One decode step: feed each row its last token, keep its routes and next logits."""
        step = batch.next_step()
        logits, routes = self._forward(step, batch.mask, batch.pos, batch.cache, keep_all=False)
        if routes is not None:
            with self._lock:
                for i, r in enumerate(batch.rows):
                    if not r.done:
                        r.routes.append(routes[i])
        batch.last = logits[:, -1]

    # -- the model
    def _forward(self, ids, mask, pos, cache, keep_all: bool):
        with self._model_lock, torch.no_grad():
            self._route_capture.clear()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                             logits_to_keep=0 if keep_all else 1)
            routes = None
            if self.num_experts:
                b, s = ids.shape
                routes = torch.zeros(b, s, self.num_hidden_layers, self.num_experts_per_tok, dtype=torch.int32)
                for layer, idx in self._route_capture.items():
                    routes[:, :, layer] = idx.reshape(b, s, -1).to(torch.int32)
                self._route_capture.clear()
            self.num_forwards += 1
        return out.logits, routes

    def _prefill(self, rows: list[Request]):
        """One forward over everything each request has so far (its prompt, plus its output when it
        was retracted), left-padded. Returns (cache, mask, last positions, last logits)."""
        from transformers import DynamicCache

        ids, mask, pos, pads = left_padded([r.input_ids + r.output_ids for r in rows])
        want_input = [r.return_logprob and r.logprob_start_len >= 0 and r.input_logprobs is None for r in rows]
        cache = DynamicCache(config=self.model.config)
        logits, routes = self._forward(ids, mask, pos, cache, keep_all=any(want_input))
        with self._lock:
            self.batch_sizes.append(len(rows))
            for i, r in enumerate(rows):
                if r.done:
                    continue
                if routes is not None:
                    r.routes = [routes[i, pads[i]:]]  # recomputed rows replace any recorded before a retract
                if want_input[i]:
                    r.input_logprobs = answers.input_logprobs(r, logits[i, pads[i]:], self.tokenizer)
        return cache, mask, pos[:, -1:], logits[:, -1]

    # -- finishing
    def _finish(self, r: Request, reason: protocol.FinishReason) -> None:
        """Under the lock: freeze the request and answer its caller."""
        if r.done:
            return
        r.done, r.finish = True, reason
        self._by_rid.pop(r.rid, None)
        try:
            answer = answers.answer(r, self.tokenizer, self.weight_version)
        except Exception as err:  # never leave a caller waiting
            r.future.set_exception(err)
        else:
            r.future.set_result(answer)
        self._cond.notify_all()
