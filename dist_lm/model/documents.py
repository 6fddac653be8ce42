"""Document-aware packing (data.document_mask): in a window packed with several documents,
each token attends only to the earlier tokens of its own document, and positions restart at 0
at each document, so a document is seen as if it were alone in the window.

Documents are told apart by the end-of-text token that closes each one: a token belongs to the
document after the last end-of-text before it. On a GPU attention goes through FlexAttention
with a block mask (blocks wholly outside every document are skipped); on a CPU, where
FlexAttention has no backward, through scaled_dot_product_attention with a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_compiled_flex = None  # FlexAttention needs compiling to be fast; done once, on first GPU use


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(batch, seq) -> each input token's document index within its window (0, 1, ...)."""
    ends = (tokens == eot_id).to(torch.int32)
    return torch.cumsum(ends, dim=1) - ends  # an end-of-text belongs to the document it closes


@dataclass
class DocumentAttention:
    """One forward pass's document structure: each token's position in its document, and the
    mask (dense on CPU, FlexAttention's block mask on GPU)."""

    positions: torch.Tensor  # (batch, seq) long
    mask: object

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> torch.Tensor:
        if isinstance(self.mask, torch.Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=enable_gqa)
        return _flex()(q, k, v, block_mask=self.mask, enable_gqa=enable_gqa)


@torch.compiler.disable  # built outside the compiled graph, once per forward, shared by every layer
def document_attention(documents: torch.Tensor) -> DocumentAttention:
    b, t = documents.shape
    index = torch.arange(t, device=documents.device).expand(b, t)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    positions = index - first
    if documents.device.type != "cuda":
        causal = torch.ones(t, t, dtype=torch.bool, device=documents.device).tril()
        mask = (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]
        return DocumentAttention(positions, mask)
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document(batch, head, q_index, kv_index):
        return (q_index >= kv_index) & (documents[batch, q_index] == documents[batch, kv_index])

    # Compiled: in eager mode create_block_mask evaluates the mask over every (query, key) pair
    # of the batch, which made the masked 125M step 3.45x the packed one (docs/benchmarks.md).
    return DocumentAttention(
        positions,
        create_block_mask(same_document, B=b, H=None, Q_LEN=t, KV_LEN=t, device=documents.device, _compile=True),
    )


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex
