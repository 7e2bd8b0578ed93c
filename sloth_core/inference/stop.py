"""Which token ids end a reply: :mod:`sloth_core.sdk.stop`, the one table and rule that
exports share (a merged export's ``generation_config`` stops where ``sloth chat`` does)."""

from sloth_core.sdk.stop import END_OF_TURN_TOKENS, end_of_turn_ids, stop_token_ids

__all__ = ["END_OF_TURN_TOKENS", "end_of_turn_ids", "stop_token_ids"]
