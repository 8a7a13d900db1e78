"""Closed-set scoring: `classify` scores every candidate label by its answer log-likelihood in
one LM pass over prompt and candidates, and mixes in the SI and prototype routes.

`IclSerScoringMixin` is mixed into `IclSerForConditionalGeneration`; it uses the model's
`language_model`, prompt embedding (`_embed_with_audio`, `_readout_on_output`) and
`speaker_routes`.
"""

from typing import Optional, Union

import torch
from transformers.cache_utils import Cache

from .route_mixing import mix_routes, mix_routes_by_k
from .speaker_routes import prototype_probabilities


class IclSerScoringMixin:
    """`classify` and the helpers it shares with the model's training pass."""

    @torch.no_grad()
    def classify(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        candidate_input_ids: torch.LongTensor,
        candidate_attention_mask: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        audio_hidden_states: Optional[torch.Tensor] = None,
        audio_hidden_mask: Optional[torch.Tensor] = None,
        audio_label_ids: Optional[torch.Tensor] = None,
        enrollment_context: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        return_routes: bool = False,
        unlabelled_summaries: Optional[list] = None,
        unlabelled_input_features: Optional[torch.Tensor] = None,
        unlabelled_feature_attention_mask: Optional[torch.Tensor] = None,
        unlabelled_row_index: Optional[torch.LongTensor] = None,
        audio_statistics: Optional[list] = None,
        **unused,
    ) -> Union[torch.Tensor, dict]:
        """Closed-set probabilities of the candidate labels for each sample.

        Each candidate (the tokens of its answer text, e.g. `" happiness\\n"`) is scored by its
        mean token log-likelihood after the prompt; a softmax over candidates gives the result.
        Prompt and candidates run in **one** LM pass: the candidates are laid side by side after
        the prompt, and a 4D attention mask lets each candidate token see the prompt and its own
        earlier tokens only, with positions continuing the prompt's (a small LM's cost on CPU is
        mostly reading its weights, so one pass instead of two matters).

        Args:
            input_ids, attention_mask, input_features, ...: the processor's (left-padded) prompt
                batch, as for `forward`. `labels` (training targets) is ignored.
            candidate_input_ids: `(n_labels, L)` shared by the batch, or `(batch, n_labels, L)`;
                right-padded.
            candidate_attention_mask: Same shape, 1 for real candidate tokens.
            cache: Key/value cache of a prompt prefix already run for every row (e.g. a speaker's
                instruction and enrollment lines); `input_ids` then hold only the rest of the prompt
                and `attention_mask` covers `prefix + input_ids`. The cache is extended in place
                (pass a fresh one per call). Scores equal those of the whole prompt in one pass.
                With an enrollment read-out, pass the prefix's `enrollment_context` too.

            return_routes: Return each route's probabilities instead of their mixture: a dict
                `{"lm", "si", "prototype"}` of `(batch, n_labels)` (None for a route the model
                lacks; NaN rows where a route cannot score), from which `mix_routes` gives the
                mixture for any `route_weights` (train.py chooses them this way).
            unlabelled_summaries: Per row, None or `(U, F)` raw summaries (`utterance_embeddings`)
                of unlabelled speech of the row's speaker, added to its speaker statistics (see
                `forward`); or that speech as the processor's `unlabelled_input_features`,
                `unlabelled_feature_attention_mask` and `unlabelled_row_index`.
            audio_statistics: Per row, None or the `(2, F)` statistics that normalize its LM input
                (see `forward`).

        Returns:
            `(batch, n_labels)` probabilities (rows sum to 1), in the candidates' order: the LM's,
            mixed with the SI and prototype routes by `config.route_weights` when set.

        Raises:
            ValueError: right-padded prompts, a mask that does not cover prefix + prompt, empty
                candidates, or an LM attention kernel that takes no 4D mask (use "sdpa" or "eager").
        """
        batch = input_ids.shape[0]
        cands, cand_mask = self._expand_candidates(candidate_input_ids, candidate_attention_mask, batch)
        if not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError("classify needs left-padded prompts (the last position of every row must be a token).")
        past = 0 if cache is None else cache.get_seq_length()
        prompt_len = input_ids.shape[1]
        if attention_mask.shape[1] != past + prompt_len:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} positions but the cached prefix ({past}) plus "
                f"input_ids ({prompt_len}) have {past + prompt_len}; it must cover both."
            )
        attention = self.language_model.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"classify scores all candidates in one pass with a 4D attention mask, which the "
                             f"{attention!r} attention kernel does not take; load the model with attn_implementation='sdpa'.")
        n_labels, cand_len = cands.shape[1], cands.shape[2]
        # Candidates side by side, without the columns that are padding in every row.
        column_mask = cand_mask.reshape(batch, n_labels * cand_len)
        kept = column_mask.bool().any(0).nonzero().squeeze(-1)
        cand_ids = cands.masked_fill(cand_mask == 0, 0).reshape(batch, -1)[:, kept]  # pads: any valid id
        cand_of, token_of = kept // cand_len, kept % cand_len

        unlabelled_summaries = self.unlabelled_from_features(
            unlabelled_summaries, unlabelled_input_features, unlabelled_feature_attention_mask, unlabelled_row_index,
            input_ids.shape[0])
        prompt = self._embed_with_audio(
            input_ids, input_features, feature_attention_mask, audio_hidden_states, audio_hidden_mask,
            audio_label_ids, enrollment_context, unlabelled_summaries=unlabelled_summaries,
            audio_statistics=audio_statistics)
        embeds, row_readout, readout_positions = prompt.embeds, prompt.readout, prompt.readout_positions
        candidate_embeds = self.get_input_embeddings()(cand_ids)
        if row_readout is not None:  # as on the answer tokens in training
            candidate_embeds = candidate_embeds + row_readout[:, None, :].to(candidate_embeds.dtype)
            readout_positions = torch.cat([readout_positions, torch.ones_like(cand_ids, dtype=torch.bool)], dim=1)
        embeds = torch.cat([embeds, candidate_embeds], dim=1)
        mask, positions = self._candidate_tree(attention_mask, prompt_len, cand_of, token_of, attention, embeds.dtype)

        # Logits only where they predict a candidate token: the prompt's end predicts token 0 of
        # every candidate, candidate c's token j-1 predicts its token j (the previous kept column).
        previous = prompt_len + torch.arange(len(kept), device=kept.device) - 1
        predictors = torch.where(token_of == 0, prompt_len - 1, previous)
        with self._readout_on_output(readout_positions, row_readout):
            logits = self.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=cache is not None, logits_to_keep=predictors,
            ).logits  # (B, kept, V)
        token_logp = logits.float().log_softmax(-1).gather(-1, cand_ids[..., None]).squeeze(-1)
        token_logp = token_logp * column_mask[:, kept]
        scores = torch.zeros(batch, n_labels, device=token_logp.device).index_add_(1, cand_of, token_logp)
        probs = (scores / cand_mask.sum(-1)).softmax(-1)
        by_k = getattr(self.config, "route_weights_by_k", None)
        if not (return_routes or by_k or self.config.route_weights or self.config.route_weights_without_enrollment):
            return probs
        routes = self._route_probabilities(probs, prompt.speaker_rows, cands, cand_mask)
        if return_routes:
            return routes
        if by_k and prompt.speaker_rows is not None:
            sizes = torch.tensor([len(row.memory) for row in prompt.speaker_rows], device=probs.device)
            return mix_routes_by_k(routes, by_k, sizes)
        return mix_routes(routes, self.config.route_weights, self.config.route_weights_without_enrollment)

    def _route_probabilities(self, probs: torch.Tensor, speaker_rows: Optional[list], cands: torch.Tensor,
                             cand_mask: torch.Tensor) -> dict:
        """`{"lm": probs, "si": (B, C) or None, "prototype": (B, C)}` for `classify`'s mixture; the
        rows a route cannot score (no enrollment for the prototype route) are NaN."""
        routes = {"lm": probs, "si": None, "prototype": None}
        if speaker_rows is None:
            return routes
        cand_embeds = self._candidate_embeddings(cands, cand_mask)
        nan = torch.full(probs.shape, float("nan"), device=probs.device)
        prototype, si = nan.clone(), (nan.clone() if self.speaker_routes is not None else None)
        for b, row in enumerate(speaker_rows):
            if not row.last_query:
                continue
            query = row.query_summaries[-1]
            if si is not None:
                si[b] = self.speaker_routes.logits(query[None], row.has_statistics, cand_embeds[b]).softmax(-1)[0]
            if len(row.memory):
                point = prototype_probabilities(query, row.memory_summaries, row.memory_labels, cand_embeds[b],
                                                float(self.config.prototype_temperature))
                if point is not None:
                    prototype[b] = point
        routes.update(si=si, prototype=prototype)
        return routes

    @staticmethod
    def _candidate_tree(
        attention_mask: torch.Tensor,
        prompt_len: int,
        cand_of: torch.Tensor,
        token_of: torch.Tensor,
        attention: str,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """4D attention mask `(B, 1, P + N, past + P + N)` and position ids `(B, P + N)` for a
        left-padded prompt (its last `prompt_len` = P tokens after `past` cached ones) followed by
        N candidate tokens, column n being token `token_of[n]` of candidate `cand_of[n]`.

        Prompt tokens see the valid prefix/prompt tokens up to themselves; candidate c's token j
        sees the whole valid prompt and candidate c's tokens 0..j, at position `n_valid + j`.
        Every token also sees itself, so padding rows stay finite. The mask is boolean (True =
        attend) for "sdpa" and additive for "eager".
        """
        batch, device = attention_mask.shape[0], attention_mask.device
        valid = attention_mask.bool()  # (B, past + P)
        past, n_cand = valid.shape[1] - prompt_len, len(cand_of)
        causal = torch.ones(prompt_len, past + prompt_len, dtype=torch.bool, device=device).tril(diagonal=past)
        own_tokens = (cand_of[:, None] == cand_of[None, :]) & (token_of[None, :] <= token_of[:, None])

        allowed = torch.zeros(batch, prompt_len + n_cand, past + prompt_len + n_cand, dtype=torch.bool, device=device)
        allowed[:, :prompt_len, : past + prompt_len] = causal & valid[:, None, :]
        allowed[:, prompt_len:, : past + prompt_len] = valid[:, None, :]
        allowed[:, prompt_len:, past + prompt_len :] = own_tokens
        diagonal = torch.arange(prompt_len + n_cand, device=device)
        allowed[:, diagonal, past + diagonal] = True

        prompt_positions = IclSerScoringMixin._positions_from_mask(attention_mask, prompt_len)
        cand_positions = valid.sum(-1, keepdim=True) + token_of[None, :]
        positions = torch.cat([prompt_positions, cand_positions], dim=1)
        if attention == "sdpa":
            return allowed[:, None], positions
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return additive[:, None], positions

    @staticmethod
    def _expand_candidates(
        ids: torch.Tensor, mask: Optional[torch.Tensor], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.ndim == 2:
            ids, mask = ids[None].expand(batch, -1, -1), mask[None].expand(batch, -1, -1)
        if ids.ndim != 3 or ids.shape[0] != batch or ids.shape != mask.shape:
            raise ValueError(
                "candidate_input_ids must be (n_labels, L) or (batch, n_labels, L) with a mask of the same "
                f"shape; got {tuple(ids.shape)} and {tuple(mask.shape)} for batch {batch}."
            )
        if ids.shape[1] == 0 or bool((mask.sum(-1) == 0).any()):
            raise ValueError("Every candidate label needs at least one token; pass non-empty labels.")
        return ids, mask.float()

    @staticmethod
    def _positions_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Left padding: positions count valid tokens only; the last `seq_len` are returned."""
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        return positions[:, -seq_len:]


__all__ = ["IclSerScoringMixin"]
