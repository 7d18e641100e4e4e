"""A request's output side: incremental text and the stop conditions, checked after each token.

Stop strings are matched on the detokenized text, like vLLM: the stop string itself is
not emitted, and while a request has stop strings the last (longest stop - 1) characters
are held back, so a stream never shows the beginning of a stop string it later retracts.
EOS and `stop_token_ids` stop on the token id (the token is in `token_ids`, not in the text).
"""
from minicake.model.tokenizer import IncrementalDetokenizer
from minicake.sched.sequence import Sequence


class RequestState:
    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer):
        self.seq = seq
        self.detokenizer = detokenizer
        self.text = ""  # all output text so far (cut at a stop string)
        self.num_emitted_chars = 0
        self.hold_back = max((len(s) for s in seq.params.stop), default=1) - 1
        self.stopped_by_string = False

    def add_token(self, token_id: int, eos_token_ids: set[int], max_model_len: int) -> tuple[str | None, str]:
        """The sequence already holds token_id. Returns (finish reason or None, new text to emit)."""
        params, seq = self.seq.params, self.seq
        reason = None
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
            reason = "stop"
        else:
            self.text += self.detokenizer.add(token_id)
            cut = min((i for i in (self.text.find(s, self.num_emitted_chars) for s in params.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                reason, self.stopped_by_string = "stop", True
        if reason is None and (seq.num_output_tokens >= params.max_tokens or len(seq) >= max_model_len):
            reason = "length"
        if reason is not None:
            return reason, self.flush()
        end = max(self.num_emitted_chars, len(self.text) - self.hold_back)
        new_text = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return None, new_text

    def flush(self) -> str:
        """Everything not emitted yet (the request is over), including the bytes of a last
        character the detokenizer was holding back (unless a stop string already cut the text)."""
        if not self.stopped_by_string:
            self.text += self.detokenizer.flush()
        new_text = self.text[self.num_emitted_chars:]
        self.num_emitted_chars = len(self.text)
        return new_text
