"""How the model reads a speaker's enrollment: each prompt row's utterance summaries
(`SpeakerRow`), the read-out's vector per audio, and the SI route's training loss.

`IclSerSpeakerContextMixin` is mixed into `IclSerForConditionalGeneration`; it uses the model's
`config`, `context_readout`, `speaker_routes` and input embeddings.
"""

from typing import Optional

import torch
from torch import nn

from .readout import IclSerContextReadout
from .speaker_routes import NORMALIZED_ENROLLMENT_MIN_K, SpeakerRow, speaker_standardize, speaker_statistics


class IclSerSpeakerContextMixin:
    """The enrollment side of `IclSerForConditionalGeneration` (read-out inputs and SI-route loss)."""

    def feed_context_readout(self, enabled: bool) -> None:
        """Whether the read-out's vector reaches the LM (its tokens and its output).

        Switched off, the model behaves as one without a read-out while the read-out's matching
        loss still trains its attention: the first stage of train.py's two-stage schedule
        (`--readout_stage_steps`), where the LM learns to label speech (K = 0) undisturbed.
        Not saved: a loaded model always feeds it.
        """
        self.context_readout_feeds_lm = bool(enabled)

    def _label_embeddings(self, audio_label_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) label token ids (-100 = none) → (N, W) mean token embedding (0 for unlabelled)."""
        valid = audio_label_ids != -100
        embeds = self.get_input_embeddings()(audio_label_ids.masked_fill(~valid, 0))
        weights = valid.to(embeds.dtype)[..., None]
        return (embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _check_audio_labels(self, audio_label_ids: Optional[torch.Tensor], n_audio: int) -> None:
        if audio_label_ids is not None and (audio_label_ids.ndim != 2 or audio_label_ids.shape[0] != n_audio):
            raise ValueError(
                f"audio_label_ids must be (n_audio, L) with one row per audio ({n_audio}), got "
                f"{tuple(audio_label_ids.shape)}. Build inputs with IclSerProcessor."
            )

    def enrollment_context(
        self,
        audio_label_ids: torch.Tensor,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        audio_hidden_states: Optional[torch.Tensor] = None,
        audio_hidden_mask: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """What the enrollment read-out needs of a speaker's K labelled utterances, computed once.

        Returns `(K, summary_width + LM width)`: each utterance's summary vector and its label's
        embedding, side by side (`None` for a model without a read-out). Pass it, expanded to
        `(batch, K, ...)`, as `enrollment_context=` to `forward`/`classify` with prompts whose
        enrollment lines come from a cached prefix (the pipeline's speaker profiles).
        """
        if self.context_readout is None:
            return None
        if input_features is not None:
            hidden, mask = self.get_audio_features(input_features, feature_attention_mask)
        elif audio_hidden_states is not None:
            hidden = audio_hidden_states
            mask = audio_hidden_mask if audio_hidden_mask is not None else torch.ones(hidden.shape[:2], dtype=torch.bool)
        else:
            raise ValueError("enrollment_context needs the enrollment audio: input_features or audio_hidden_states.")
        self._check_audio_labels(audio_label_ids, hidden.shape[0])
        if bool((audio_label_ids == -100).all(-1).any()):
            raise ValueError("Every enrollment utterance needs its label's token ids in audio_label_ids.")
        summaries = self.context_readout.summarize(hidden, mask.to(hidden.device))
        labels = self._label_embeddings(audio_label_ids.to(hidden.device)).float()
        return torch.cat([summaries, labels], dim=-1)

    def unlabelled_from_features(
        self,
        unlabelled_summaries: Optional[list],
        unlabelled_input_features: Optional[torch.Tensor],
        unlabelled_feature_attention_mask: Optional[torch.Tensor],
        unlabelled_row_index: Optional[torch.Tensor],
        n_rows: int,
    ) -> Optional[list]:
        """Per row, the `(U, F)` summaries of its unlabelled clips from the processor's
        `unlabelled_input_features` (`processor(..., unlabelled=...)`; `unlabelled_row_index` says
        whose clip each is); `unlabelled_summaries` unchanged when no features are given."""
        if unlabelled_input_features is None:
            return unlabelled_summaries
        if unlabelled_summaries is not None:
            raise ValueError("Pass the unlabelled speech once: unlabelled_input_features (from the processor) or "
                             "unlabelled_summaries (from utterance_embeddings), not both.")
        if unlabelled_row_index is None or len(unlabelled_row_index) != len(unlabelled_input_features):
            raise ValueError("unlabelled_input_features need unlabelled_row_index, the row of each clip; build both with "
                             "processor(..., unlabelled=...).")
        index = torch.as_tensor(unlabelled_row_index).long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= n_rows):
            raise ValueError(f"unlabelled_row_index must name rows 0..{n_rows - 1} of the batch, got {index.tolist()}.")
        summaries = self.utterance_embeddings(unlabelled_input_features, unlabelled_feature_attention_mask)
        return [summaries[index == row] if bool((index == row).any()) else None for row in range(n_rows)]

    def _speaker_rows(
        self,
        placeholders: torch.Tensor,
        hidden: torch.Tensor,
        hidden_mask: torch.Tensor,
        audio_label_ids: Optional[torch.Tensor],
        enrollment_context: Optional[torch.Tensor],
        unlabelled_summaries: Optional[list] = None,
    ) -> tuple[list[SpeakerRow], torch.Tensor]:
        """Each row's `SpeakerRow` (its unlabelled audios and its enrollment: `enrollment_context`'s
        utterances first, then its labelled audios), and `(n_audio,)` which audios are labelled.
        Speaker statistics come from the enrollment plus the row's `unlabelled_summaries` (if any)."""
        n_audio = hidden.shape[0]  # audio_label_ids' shape was checked by _embed_with_audio
        width = self.get_input_embeddings().weight.shape[-1]
        per_row = (placeholders.sum(-1) // self.config.num_audio_tokens).tolist()
        if enrollment_context is not None and enrollment_context.shape[0] != len(per_row):
            raise ValueError(f"enrollment_context has {enrollment_context.shape[0]} rows for a batch of {len(per_row)}.")
        if unlabelled_summaries is not None and len(unlabelled_summaries) != len(per_row):
            raise ValueError(f"unlabelled_summaries has {len(unlabelled_summaries)} entries for a batch of {len(per_row)}; "
                             "pass one (U, F) tensor or None per row.")
        summaries = IclSerContextReadout.summarize(hidden, hidden_mask)
        if audio_label_ids is None:
            labelled = torch.zeros(n_audio, dtype=torch.bool, device=hidden.device)
            label_embeds = torch.zeros(n_audio, width, device=hidden.device)
        else:
            audio_label_ids = audio_label_ids.to(hidden.device)
            labelled = (audio_label_ids != -100).any(-1)
            label_embeds = self._label_embeddings(audio_label_ids).float()
        split = summaries.shape[-1]
        normalize = bool(self.config.speaker_normalization)
        floor = float(self.config.speaker_variance_floor)
        rows, start = [], 0
        for row, count in enumerate(per_row):
            index = torch.arange(start, start + count, device=hidden.device)
            start += count
            enrolled, queries = index[labelled[index]], index[~labelled[index]]
            memory, memory_labels = summaries[enrolled], label_embeds[enrolled]
            if enrollment_context is not None:
                context = enrollment_context[row].to(hidden.device).float()
                memory = torch.cat([context[:, :split], memory])
                memory_labels = torch.cat([context[:, split:], memory_labels])
            query_summaries, memory_summaries = summaries[queries], memory
            # Unlabelled speech of the row's speaker adds to its statistics only (not to the read-out's memory).
            extra = None if unlabelled_summaries is None else unlabelled_summaries[row]
            stats = memory if extra is None or not len(extra) else torch.cat([memory, extra.to(memory.device, memory.dtype)])
            if extra is not None and len(extra) and extra.shape[-1] != split:
                raise ValueError(f"unlabelled_summaries[{row}] has width {extra.shape[-1]}, the model's summaries {split}; "
                                 "compute them with model.utterance_embeddings.")
            if normalize:
                query_summaries = speaker_standardize(query_summaries, stats, floor)
                memory_summaries = speaker_standardize(memory, stats, floor)
            rows.append(SpeakerRow(queries, enrolled, bool(count) and not bool(labelled[index[-1]]), memory, memory_labels,
                                   query_summaries, memory_summaries, len(stats) > 0,
                                   speaker_statistics(stats, floor) if normalize else None))
        return rows, labelled

    def _read_enrollment(
        self,
        speaker_rows: list[SpeakerRow],
        labelled: torch.Tensor,
        audio_label_ids: Optional[torch.Tensor],
        enrollment_context: Optional[torch.Tensor],
        query_answers: Optional[list[list[int]]] = None,
    ) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], int]]:
        """(N, W) read-out vector per audio: zero for labelled (enrollment) audios and for queries
        without enrollment; for each unlabelled audio, the read-out over its row's enrollment
        (`_speaker_rows`). With `query_answers` (row i's query answer ids), also `(mean matching
        loss, rows)` over the rows' last unlabelled audios, else `(None, 0)`."""
        n_audio = labelled.shape[0]
        width = self.get_input_embeddings().weight.shape[-1]
        out = torch.zeros(n_audio, width, device=labelled.device, dtype=torch.float32)
        if audio_label_ids is None and enrollment_context is None:
            return out, (None, 0)
        if not self.context_readout_feeds_lm and query_answers is None:
            return out, (None, 0)  # switched off and no matching loss asked for: nothing to read
        rows, reads, losses = [], [], []
        for row, speaker in enumerate(speaker_rows):
            queries = speaker.queries
            if len(queries) and len(speaker.memory):
                read, weights = self.context_readout(speaker.query_summaries, speaker.memory_summaries, speaker.memory_labels)
                rows.append(queries)
                reads.append(read.float())
                if query_answers is not None and enrollment_context is None:
                    answer = query_answers[row]
                    matches = torch.tensor([[[i for i in ids if i != -100] == answer
                                             for ids in audio_label_ids[speaker.enrolled].tolist()]],
                                           dtype=torch.bool, device=labelled.device)
                    losses.append(self.context_readout.matching_loss(weights[-1:], matches))
        if rows:
            out = out.index_copy(0, torch.cat(rows), torch.cat(reads))
        drop = float(self.config.context_readout_dropout)
        if self.training and drop > 0:
            # Whole queries without their read-out: the LM must keep learning to label speech
            # itself (its K = 0 skill) instead of leaning on the read-out whenever K > 0.
            out = out * (torch.rand(n_audio, 1, device=out.device) >= drop).to(out.dtype)
        loss = (torch.stack(losses).mean() if losses else None, len(losses))
        if not self.context_readout_feeds_lm:
            return torch.zeros_like(out), loss
        return out, loss

    @staticmethod
    def _query_answers(labels: torch.Tensor) -> list[list[int]]:
        """Each row's last run of target tokens (its query's answer) from training `labels`."""
        answers = []
        for row in labels.tolist():
            end = len(row)
            while end and row[end - 1] == -100:
                end -= 1
            start = end
            while start and row[start - 1] != -100:
                start -= 1
            answers.append(row[start:end])
        return answers

    def _candidate_embeddings(self, cands: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
        """`(B, C, L)` candidate ids and mask → `(B, C, W)` label embeddings (as the read-out's)."""
        embeds = self._label_embeddings(cands.masked_fill(cand_mask == 0, -100).flatten(0, 1))
        return embeds.float().view(*cands.shape[:2], -1)

    def _si_route_loss(self, speaker_rows: list, answers: list, audio_label_ids: Optional[torch.Tensor],
                       candidate_input_ids, candidate_attention_mask):
        """Cross-entropy of the SI route over the candidates: `(mean over rows, rows)`, `(None, 0)`
        when no row has a target among the candidates.

        A row's examples: its query (the normalized head when the row has enrollment, else the
        raw one) and each enrollment utterance, on the raw head (the speaker-independent task,
        five times the examples of the queries alone) and, with `NORMALIZED_ENROLLMENT_MIN_K`
        or more of them, on the normalized head too (its statistics then hardly depend on the
        utterance itself).
        """
        cands, cand_mask = self._expand_candidates(candidate_input_ids, candidate_attention_mask, len(speaker_rows))
        cand_embeds = self._candidate_embeddings(cands, cand_mask)
        normalized_head = self.speaker_routes.normalized is not None
        losses = []
        for row, speaker in enumerate(speaker_rows):
            options = [[i for i, keep in zip(ids, kept) if keep]
                       for ids, kept in zip(cands[row].tolist(), cand_mask[row].tolist())]
            index_of = {tuple(ids): c for c, ids in reversed(list(enumerate(options)))}
            terms = []

            def add(summaries: torch.Tensor, normalized: bool, targets: list) -> None:
                keep = [i for i, t in enumerate(targets) if t is not None]
                if keep:
                    logits = self.speaker_routes.logits(summaries[keep], normalized, cand_embeds[row])
                    target = torch.tensor([targets[i] for i in keep], device=logits.device)
                    terms.append(nn.functional.cross_entropy(logits, target, reduction="none"))

            if speaker.last_query and answers is not None:
                add(speaker.query_summaries[-1:], speaker.has_statistics, [index_of.get(tuple(answers[row]))])
            if len(speaker.enrolled) and audio_label_ids is not None:
                targets = [index_of.get(tuple(i for i in ids if i != -100))
                           for ids in audio_label_ids[speaker.enrolled].tolist()]
                own = speaker.memory[-len(speaker.enrolled):]  # the row's labelled audios come last
                add(own, False, targets)
                if normalized_head and len(speaker.memory) >= NORMALIZED_ENROLLMENT_MIN_K:
                    add(speaker.memory_summaries[-len(speaker.enrolled):], True, targets)
            if terms:
                losses.append(torch.cat(terms).mean())
        if not losses:
            return None, 0
        return torch.stack(losses).mean(), len(losses)


__all__ = ["IclSerSpeakerContextMixin"]
