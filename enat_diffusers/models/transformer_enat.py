"""The ENAT transformer: a non-autoregressive token transformer with an encoder/decoder split and feature reuse.

Each forward call sorts the `L` tokens of the grid into three groups (`ENATTokenGroups`):

* reused: visible now and already visible at the previous step of the same sampling stream. They skip the encoder;
  their previous final features, passed through a small residual projection, act as fixed extra keys/values
  ("context") at every encoder layer and become their features at this step.
* encoded: visible tokens that go through the encoder blocks: all visible tokens without a previous state, only the
  critical tokens (revealed since the previous step) with one.
* masked: mask tokens, handled only by the decoder blocks, which attend to all visible features as context.

Per step and image, the encoder costs `O(n_encoded * (n_reused + n_encoded))` attention and `O(n_encoded)` MLP work
per layer instead of `O(L^2)` and `O(L)`; the decoder is small. Features before the output norm are returned as
`reuse_state` for the next step.

Editing adds a fourth kind of token: kept tokens (`ENATKeptContext`), which stay visible and unchanged for the rest
of a run. After their first pass they are neither reused nor encoded: their keys/values at every block are computed
once, like text keys/values, and shared by the samples of one image.

Rows of a batch may have groups of different sizes (editing: every image masks its own region). Each group is then
padded to its largest row; padding slots are left out of attention as keys and out of the results, so a row's logits
are those of the row run alone. A batch whose rows have equal group sizes (plain generation) has no padding and no
attention mask: the computation is the same as without ragged support.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..checks import (
    check_class_label_range,
    check_class_label_tensor,
    check_text_companions,
    check_text_embeds,
    check_token_id_range,
    check_token_id_tensor,
)
from ..hub import ENATHubMixin


@dataclass
class ENATReuseState(BaseOutput):
    """
    What one sampling stream hands from one step to the next.

    Args:
        features (`torch.Tensor` of shape `(batch_size, num_tokens, hidden_size)`):
            Final features of every token (raster order) before the output norm.
        masking (`torch.BoolTensor` of shape `(batch_size, num_tokens)`):
            Which tokens were masked in the input that produced `features`.
    """

    # Defaults keep the class rebuildable from a dict, which accelerate's device hooks rely on.
    features: torch.Tensor = None
    masking: torch.BoolTensor = None


@dataclass
class ENATConditioning(BaseOutput):
    """
    The condition of a batch in the form every block consumes it. It does not change between sampling steps, so a
    sampler computes it once (the first call returns it, or `ENATTransformer2DModel.prepare_conditioning`) and passes
    it as `conditioning=` to the later steps: that saves one `(D, 8D)` adaLN projection per block and step and, for
    text, the key/value projection of the text.

    Args:
        modulation (`torch.Tensor` of shape `(batch_size, num_blocks, 8 * hidden_size)`):
            adaLN shifts, scales and gates of every block (encoder blocks first).
        text_key_values (`torch.Tensor` of shape `(batch_size, num_blocks, text_length, 2 * hidden_size)`):
            Text-conditioned models: keys and values of the text tokens at every block.
        text_mask (`torch.BoolTensor` of shape `(batch_size, text_length)`, *optional*):
            False for padding text tokens.
    """

    modulation: torch.Tensor = None
    text_key_values: torch.Tensor = None
    text_mask: torch.BoolTensor = None


@dataclass
class ENATKeptContext(BaseOutput):
    """
    Tokens that stay visible and unchanged for the rest of a sampling run (the kept tokens of an edited image),
    prepared once by `ENATTransformer2DModel.prepare_kept_context` as fixed context: at every later step they take
    no part in the encoder, and every block attends to their stored keys/values (the way it attends to text). Their
    features are the reuse projection of their first-pass features, which is what the reuse projection gives them at
    the first reuse step; without a kept context the projection is applied again at every step (the generation rule),
    which costs a projection and keys/values at every block, every step. One group serves `rows_per_group`
    consecutive batch rows (the samples of one image in one guidance stream), so that cost is paid once per image.

    Args:
        positions (`torch.LongTensor` of shape `(num_groups, num_kept)`):
            Raster positions of each group's kept tokens; groups with fewer kept tokens are padded with `num_tokens`.
        features (`torch.Tensor` of shape `(num_groups, num_kept, hidden_size)`):
            Their features at every later step.
        key_values (`torch.Tensor` of shape `(num_groups, num_blocks, num_kept, 2 * hidden_size)`):
            Their keys/values at every block (encoder blocks first).
        valid (`torch.BoolTensor` of shape `(num_groups, num_kept)`):
            False at padding slots.
        rows_per_group (`int`):
            Consecutive batch rows served by one group: a batch has `num_groups * rows_per_group` rows.
    """

    positions: torch.LongTensor = None
    features: torch.Tensor = None
    key_values: torch.Tensor = None
    valid: torch.BoolTensor = None
    rows_per_group: int = 1

    def for_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-group tensor repeated for the batch rows each group serves."""
        return tensor if self.rows_per_group == 1 else tensor.repeat_interleave(self.rows_per_group, dim=0)


@dataclass
class ENATTransformer2DModelOutput(BaseOutput):
    """
    Args:
        logits (`torch.Tensor` of shape `(batch_size, codebook_size, height, width)`):
            Unnormalised scores over the codebook for every token of the grid.
        reuse_state (`ENATReuseState`):
            Pass it as `reuse_state=` to the next step of the same sampling stream.
    """

    logits: torch.Tensor = None
    reuse_state: ENATReuseState = None
    conditioning: ENATConditioning = None


@dataclass
class ENATTokenCounts:
    """
    Host numbers of one forward call, fetched from the device at once (`fetch`, one sync): the per-row counts of
    masked, reused and kept tokens that size the token groups, and the extremes that the input checks read.
    """

    masked: list[int]
    reused: list[int]
    kept: list[int]
    id_min: int
    id_max: int
    label_min: int
    label_max: int
    any_remasked: bool
    any_kept_masked: bool

    @classmethod
    def fetch(
        cls,
        input_ids: torch.LongTensor,
        masking: torch.BoolTensor,
        reused: torch.BoolTensor,
        class_labels: torch.LongTensor | None,
        reuse_state: "ENATReuseState | None",
        kept: torch.BoolTensor | None,
    ) -> "ENATTokenCounts":
        batch_size = input_ids.shape[0]
        remasked = torch.zeros_like(masking)
        if reuse_state is not None:
            remasked = masking & ~reuse_state.masking.to(masking.device)
        labels = class_labels if class_labels is not None else input_ids.new_zeros(1)
        kept_masked = torch.zeros_like(masking) if kept is None else kept & masking
        kept_rows = torch.zeros_like(masking) if kept is None else kept
        values = [input_ids.min(), input_ids.max(), labels.min(), labels.max(), remasked.any(), kept_masked.any()]
        values += [masking.sum(1), reused.sum(1), kept_rows.sum(1)]
        host = torch.cat([v.to(input_ids.device).reshape(-1).long() for v in values]).tolist()
        counts = host[6:]
        return cls(
            masked=counts[:batch_size],
            reused=counts[batch_size : 2 * batch_size],
            kept=counts[2 * batch_size :],
            id_min=host[0],
            id_max=host[1],
            label_min=host[2],
            label_max=host[3],
            any_remasked=bool(host[4]),
            any_kept_masked=bool(host[5]),
        )


@dataclass
class ENATTokenGroups:
    """
    Which tokens of each row a forward call reuses, encodes and leaves masked, laid out group after group. Kept tokens
    (`ENATKeptContext`) have no slot: they enter as stored keys/values.

    Args:
        order (`torch.LongTensor` of shape `(batch_size, sum(sizes))`):
            Raster position of every slot: the reused group, then the encoded group, then the masked group, each in
            raster order. Padding slots hold `num_tokens` (one past the last position).
        sizes (`tuple[int, int, int]`):
            Widths of the reused, encoded and masked groups: the largest count of any row.
        valid (`torch.BoolTensor` of shape `(batch_size, sum(sizes))`, *optional*):
            False at padding slots. None when every row has the same counts: then `order` is a permutation of each
            row and nothing is padded.
    """

    order: torch.LongTensor
    sizes: tuple[int, int, int]
    valid: torch.BoolTensor | None = None

    @classmethod
    def from_masks(
        cls,
        masking: torch.BoolTensor,
        reused: torch.BoolTensor,
        masked_counts: list[int],
        reused_counts: list[int],
        kept: torch.BoolTensor | None = None,
        kept_counts: list[int] | None = None,
    ) -> "ENATTokenGroups":
        """
        Groups of the tokens given which are masked, reused and kept `(B, L)` (kept: optional), and the per-row
        counts of each (host integers, which fix the group widths without another device sync).
        """
        batch_size, num_tokens = masking.shape
        kept_counts = kept_counts or [0] * batch_size
        encoded_counts = [
            num_tokens - m - r - k for m, r, k in zip(masked_counts, reused_counts, kept_counts, strict=True)
        ]
        sizes = (max(reused_counts), max(encoded_counts), max(masked_counts))
        total = sum(sizes)
        group = torch.where(masking, 2, torch.where(reused, 0, 1))
        if kept is not None:
            group = torch.where(kept, 3, group)
        # Slot of a token = start of its group + its rank among the row's tokens of that group (raster order); kept
        # tokens all land in one extra slot past the groups, which is dropped.
        rank = F.one_hot(group, 4).cumsum(dim=1).gather(2, group[..., None]).squeeze(-1) - 1
        starts = torch.tensor([0, sizes[0], sizes[0] + sizes[1], total], device=masking.device)
        slots = torch.where(group == 3, total, starts[group] + rank)
        positions = torch.arange(num_tokens, device=masking.device).expand(batch_size, num_tokens)
        order = positions.new_full((batch_size, total + 1), num_tokens).scatter_(1, slots, positions)[:, :total]
        ragged = len(set(zip(masked_counts, reused_counts, encoded_counts, strict=True))) > 1
        return cls(order=order, sizes=sizes, valid=order < num_tokens if ragged else None)

    def attention_masks(
        self, prefix_mask: torch.BoolTensor | None, prefix_length: int
    ) -> tuple[torch.BoolTensor | None, torch.BoolTensor | None]:
        """
        Key masks `(B, num_keys)` of the encoder blocks (keys: prefix, reused, encoded) and of the decoder blocks
        (keys: prefix, reused, encoded, masked), True for keys to attend to; None where every key counts. The prefix
        holds the stored keys/values (text, then kept tokens) of `prefix_length` keys, with mask `prefix_mask`
        (None: all count).
        """
        num_visible = self.sizes[0] + self.sizes[1]
        if self.valid is None:
            if prefix_mask is None:
                return None, None
            ones = prefix_mask.new_ones(prefix_mask.shape[0], sum(self.sizes))
            return torch.cat([prefix_mask, ones[:, :num_visible]], dim=1), torch.cat([prefix_mask, ones], dim=1)
        if prefix_mask is None:
            prefix_mask = self.valid.new_ones(self.valid.shape[0], prefix_length)
        masks = [torch.cat([prefix_mask, self.valid[:, :num_visible]], 1), torch.cat([prefix_mask, self.valid], 1)]
        # A row without any key to attend to has only padding queries (e.g. a fully masked row in the encoder next
        # to rows with visible tokens). Kernels differ on such queries (torch's SDPA returns zeros, others NaN);
        # letting them attend to the padding keeps their discarded outputs finite in every kernel, since a NaN
        # there would reach the row's real tokens through the zero attention weight of a masked key.
        return tuple(mask | ~mask.any(dim=1, keepdim=True) for mask in masks)


def _modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return hidden_states * (1 + scale) + shift


class ENATTokenEmbedding(nn.Module):
    """Token ids `(B, L)` -> embeddings `(B, L, D)`: word + learned position embedding, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, num_positions: int, hidden_size: int, dropout: float):
        super().__init__()
        self.word_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(num_positions, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        embeddings = self.word_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]
        return self.dropout(self.norm(embeddings))


class ENATReuseProjection(nn.Module):
    """Maps previous-step features to this step's context tokens: `x + MLP(LayerNorm(x))`, shapes `(B, N, D)`."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.ff = FeedForward(hidden_size, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.ff(self.norm(features))


class ENATAttnProcessor:
    """
    Attention of [`ENATAttention`] through diffusers' attention dispatch (`dispatch_attention_fn`), so
    `transformer.set_attention_backend(...)` chooses the kernel (torch's SDPA by default; flash, cuDNN, sage, ...
    where installed). Batches with an attention mask (ragged rows, padded text) need a backend that takes a mask.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "ENATAttention",
        hidden_states: torch.Tensor,
        context_key_values: tuple[torch.Tensor, ...] = (),
        attention_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        query, own_key_values = attn.project_own_tokens(hidden_states)
        key_values = [*context_key_values, own_key_values]
        key, value = (torch.cat(key_values, dim=1) if len(key_values) > 1 else key_values[0]).chunk(2, dim=-1)
        # The dispatcher takes (batch, tokens, heads, head_dim).
        query, key, value = (x.unflatten(-1, (attn.heads, -1)) for x in (query, key, value))
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :]
        attended = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.to_out(attended.flatten(2).to(query.dtype))


class ENATAttention(nn.Module, AttentionModuleMixin):
    """
    Multi-head attention whose keys/values come from two sources with separate projections: the block's own tokens
    (`to_kv`) and optional context tokens (`to_kv_context`). Queries come from the block's own tokens only. The
    attention itself runs in the processor ([`ENATAttnProcessor`]).
    """

    _default_processor_cls = ENATAttnProcessor
    _available_processors = [ENATAttnProcessor]
    # `fuse_qkv_projections()` joins the queries' projection with the own tokens' key/value projection (`to_kv`,
    # fused already, as checkpoints store it) into `to_qkv`: one matmul for the block's tokens. `to_kv` stays after
    # unfusing, since it is the model's own layer (diffusers' generic mixin expects it to go: not applicable here).
    _supports_qkv_fusion = True

    def __init__(self, hidden_size: int, num_heads: int, processor: ENATAttnProcessor | None = None):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"`num_attention_heads` must be a positive integer that divides `hidden_size` ({hidden_size}), "
                f"got {num_heads!r}"
            )
        self.heads = num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.to_kv_context = nn.Linear(hidden_size, 2 * hidden_size)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        self.set_processor(processor or self._default_processor_cls())

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Adds `to_qkv`, the query and own key/value projections in one layer, and sets `fused_projections`."""
        if self.fused_projections:
            return
        weight = torch.cat([self.to_q.weight, self.to_kv.weight])
        self.to_qkv = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        self.to_qkv.weight.copy_(weight)
        self.to_qkv.bias.copy_(torch.cat([self.to_q.bias, self.to_kv.bias]))
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        """Removes `to_qkv`; `to_q` and `to_kv` are used again."""
        if not self.fused_projections:
            return
        del self.to_qkv
        self.fused_projections = False

    def project_own_tokens(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries `(B, N, D)` and keys/values `(B, N, 2D)` of the block's own tokens."""
        if self.fused_projections:
            query_key_values = self.to_qkv(hidden_states)
            return query_key_values.split([hidden_states.shape[-1], 2 * hidden_states.shape[-1]], dim=-1)
        return self.to_q(hidden_states), self.to_kv(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context_key_values: tuple[torch.Tensor, ...] = (),
        attention_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """
        `hidden_states` `(B, N, D)` -> `(B, N, D)`. `context_key_values`: keys/values `(B, M_i, 2D)` of context
        tokens (from `ENATBlock.context_key_values`), attended before the own tokens; `attention_mask` `(B, K)`
        covers all `K` keys, context first (False: ignore that key), or is None.
        """
        return self.processor(self, hidden_states, context_key_values, attention_mask)


class ENATBlock(nn.Module):
    """
    adaLN-Zero transformer block. Its own tokens and the context tokens are normalised and modulated separately
    (eight modulation vectors from the conditioning embedding), then the own tokens attend to both.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm1_context = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = ENATAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(hidden_size, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.adaln_modulation = nn.Linear(hidden_size, 8 * hidden_size)

    def modulation(self, conditioning: torch.Tensor) -> torch.Tensor:
        """`conditioning` `(B, D)` -> the eight modulation vectors concatenated, `(B, 8D)`."""
        return self.adaln_modulation(F.silu(conditioning))

    def context_key_values(self, context: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """Context tokens `(B, M, D)` -> their keys/values `(B, M, 2D)` (`modulation` `(B, 8D)`)."""
        shift_context, scale_context = modulation[:, None].chunk(8, dim=-1)[2:4]
        return self.attn.to_kv_context(_modulate(self.norm1_context(context), shift_context, scale_context))

    def forward(
        self,
        hidden_states: torch.Tensor,
        modulation: torch.Tensor,
        context: torch.Tensor | None = None,
        stored_key_values: torch.Tensor | None = None,
        attention_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """
        `hidden_states` `(B, N, D)`, `modulation` `(B, 8D)` (from `modulation()`), `context` `(B, M, D)` or None,
        `stored_key_values` `(B, S, 2D)`: keys/values computed ahead (text, kept tokens; from
        `context_key_values()`) or None, `attention_mask` `(B, S + M + N)` (keys in that order; False: ignore) or
        None -> `(B, N, D)`.
        """
        shift, scale, _, _, gate_attn, shift_ff, scale_ff, gate_ff = modulation[:, None].chunk(8, dim=-1)
        context_key_values = () if stored_key_values is None else (stored_key_values,)
        if context is not None:
            context_key_values += (self.context_key_values(context, modulation),)
        attn_input = _modulate(self.norm1(hidden_states), shift, scale)
        hidden_states = hidden_states + gate_attn * self.attn(attn_input, context_key_values, attention_mask)
        return hidden_states + gate_ff * self.ff(_modulate(self.norm2(hidden_states), shift_ff, scale_ff))


class ENATOutputHead(nn.Module):
    """Features `(B, L, D)` -> logits `(B, L, K)`, scored against the (frozen) input word embeddings."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.norm_out = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, features: torch.Tensor, word_embedding: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm(F.gelu(self.proj(self.norm_out(features))))
        codebook_size = word_embedding.shape[0]
        # ENAT trains the head against detached word embeddings; the mask token gets no score.
        return F.linear(hidden_states, word_embedding.detach(), self.bias[:codebook_size])


ENAT_PRESETS = {
    "ENAT-S": {"hidden_size": 366, "num_attention_heads": 6, "num_encoder_layers": 15, "num_decoder_layers": 1},
    "ENAT-B": {"hidden_size": 768, "num_attention_heads": 8, "num_encoder_layers": 15, "num_decoder_layers": 1},
    "ENAT-L": {"hidden_size": 1024, "num_attention_heads": 16, "num_encoder_layers": 22, "num_decoder_layers": 2},
    # The paper's MS-COCO model: ENAT-B conditioned on CLIP ViT-L/14 text (77 tokens, 768-d, 768-d pooled).
    "ENAT-B-COCO": {
        "hidden_size": 768,
        "num_attention_heads": 8,
        "num_encoder_layers": 15,
        "num_decoder_layers": 1,
        "num_classes": None,
        "text_embed_dim": 768,
        "pooled_text_embed_dim": 768,
    },
}


class ENATTransformer2DModel(ENATHubMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """
    The ENAT transformer (Ni et al., "ENAT: Rethinking Spatial-temporal Interactions in Token-based Image
    Synthesis", NeurIPS 2024): predicts every token of a `sample_size x sample_size` grid of VQ codes from a
    partially masked grid, encoding visible tokens without the mask tokens and reusing previous-step features.

    Conditioning is either a class label (`num_classes`) or text (`text_embed_dim`). Text hidden states are
    projected to the model width once per forward and join the context keys/values of every encoder and decoder
    block (through the context normalisation and projection, like reused features), so ENAT's split is unchanged: the
    encoder still only runs visible tokens, and the text adds `T` keys/values per layer (`O(n_queries * T)` attention
    and `O(T * D^2)` projection work per layer and image, e.g. 77 text tokens). The pooled text embedding, or the
    masked mean of the projected text tokens when the encoder gives none, drives adaLN in place of the class embedding.

    Args:
        sample_size (`int`, defaults to 16): Side of the token grid (16 for 256 px, 32 for 512 px with an f16 VQ).
        codebook_size (`int`, defaults to 1024): Number of VQ codes; id `codebook_size` is the mask token.
        hidden_size (`int`, defaults to 1024): Width of the transformer.
        num_attention_heads (`int`, defaults to 16): Attention heads per block.
        num_encoder_layers (`int`, defaults to 22): Blocks that only see visible tokens.
        num_decoder_layers (`int`, defaults to 2): Blocks that update the mask tokens.
        mlp_ratio (`float`, defaults to 4.0): Hidden size of the MLPs relative to `hidden_size`.
        num_classes (`int`, *optional*, defaults to 1000): Class-conditional models; label `num_classes` is the
            null class used for classifier-free guidance. `None` for text-conditioned models.
        class_dropout_prob (`float`, defaults to 0.1): In training mode, labels are replaced by the null class with
            this probability (text models get their null condition, the empty prompt, from the data instead).
        hidden_dropout_prob (`float`, defaults to 0.1): Dropout on the token embeddings in training mode.
        text_embed_dim (`int`, *optional*): Width of the text encoder's hidden states; makes the model
            text-conditioned.
        pooled_text_embed_dim (`int`, *optional*): Width of the text encoder's pooled embedding, if it has one.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ENATBlock"]
    # Regional compilation: `transformer.compile_repeated_blocks(dynamic=True)` compiles each block once for all
    # token counts of the sampling steps (compiling the whole model recompiles at every step).
    _repeated_blocks = ["ENATBlock"]
    _card_tags = ("transformer",)
    _skip_layerwise_casting_patterns = ["embedding", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        codebook_size: int = 1024,
        hidden_size: int = 1024,
        num_attention_heads: int = 16,
        num_encoder_layers: int = 22,
        num_decoder_layers: int = 2,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 1000,
        class_dropout_prob: float = 0.1,
        hidden_dropout_prob: float = 0.1,
        text_embed_dim: int | None = None,
        pooled_text_embed_dim: int | None = None,
    ):
        super().__init__()
        if (num_classes is None) == (text_embed_dim is None):
            raise ValueError(
                "set exactly one of `num_classes` (class-conditional) and `text_embed_dim` (text-conditioned), "
                f"got num_classes={num_classes}, text_embed_dim={text_embed_dim}"
            )
        if pooled_text_embed_dim is not None and text_embed_dim is None:
            raise ValueError("`pooled_text_embed_dim` needs `text_embed_dim`")
        self.embed = ENATTokenEmbedding(codebook_size + 1, sample_size**2, hidden_size, hidden_dropout_prob)
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)
        else:
            self.context_embedder = nn.Linear(text_embed_dim, hidden_size)
            if pooled_text_embed_dim is not None:
                self.pooled_text_embedder = nn.Linear(pooled_text_embed_dim, hidden_size)
        self.reuse_proj = ENATReuseProjection(hidden_size, mlp_ratio)
        self.encoder_blocks = nn.ModuleList(
            [ENATBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(num_encoder_layers)]
        )
        self.decoder_blocks = nn.ModuleList(
            [ENATBlock(hidden_size, num_attention_heads, mlp_ratio) for _ in range(num_decoder_layers)]
        )
        self.head = ENATOutputHead(hidden_size, codebook_size + 1)
        self.gradient_checkpointing = False
        self._init_weights()

    def _card_usage(self, repo_id: str) -> str:
        return f"""
from enat_diffusers import ENATTransformer2DModel

transformer = ENATTransformer2DModel.from_pretrained("{repo_id}")
"""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs):
        """
        [`ModelMixin.from_pretrained`], stricter: weights that do not fit the config are a load error. A folder whose
        config asks for tensors its weights lack (a missing tensor, more layers than were saved) or whose weights
        hold tensors the config has no place for (fewer layers, another kind of model) is refused, naming the
        tensors, instead of loading with a warning and failing at the first call or silently running a different
        model. (The head count does not show in the weights: a count that does not divide `hidden_size` is refused
        by the config check; another divisor cannot be detected.) `output_loading_info=True` works as usual.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        problems = []
        for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "not used by the config")):
            names = sorted(loading_info.get(key) or [])
            if names:
                shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
                problems.append(f"{what}: {shown}")
        if problems:
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not match its {cls.__name__} config "
                f"({'; '.join(problems)}); check that config.json belongs to these weights"
            )
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ENATTransformer2DModel":
        """A randomly initialised model of a paper configuration (`ENAT_PRESETS`), e.g. `from_preset("ENAT-B")`."""
        if name not in ENAT_PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(ENAT_PRESETS)}")
        return cls(**{**ENAT_PRESETS[name], **overrides})

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        embeddings = [self.embed.word_embedding, self.embed.position_embedding]
        if self.is_class_conditional:
            embeddings.append(self.class_embedding)
        for embedding in embeddings:
            nn.init.normal_(embedding.weight, std=0.02)
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            nn.init.zeros_(block.adaln_modulation.weight)
            nn.init.zeros_(block.adaln_modulation.bias)

    @property
    def is_class_conditional(self) -> bool:
        return self.config.num_classes is not None

    @torch.no_grad()
    def resize_class_embedding(
        self,
        num_classes: int | None = None,
        *,
        sources: list[int | None] | None = None,
        weight: torch.Tensor | None = None,
    ) -> nn.Embedding:
        """
        Gives a class-conditional model a new set of classes (fine-tuning on new classes, a LoRA that brings its own):
        a new class embedding of `num_classes + 1` rows, the null class of classifier-free guidance last, and
        `num_classes` in the config. Give exactly one of:

        - `num_classes`: classes that exist keep their rows, further ones start from the mean of the existing rows;
        - `sources`: per class of the new set, the id of the current class whose row it starts from, or `None` for
          the mean of the current rows (a neutral start that guidance already separates from the null class);
        - `weight`: the whole `(num_classes + 1, hidden_size)` table, null class last (as a LoRA file carries it).

        The null row is kept unless `weight` replaces it. The new embedding has the old one's device, dtype and
        `requires_grad`, and is returned.
        """
        if not self.is_class_conditional:
            raise ValueError("`resize_class_embedding` is for class-conditional models; this one is text-conditioned")
        if sum(value is not None for value in (num_classes, sources, weight)) != 1:
            raise ValueError("give exactly one of `num_classes`, `sources` and `weight` to `resize_class_embedding`")
        old = self.class_embedding.weight
        old_classes, hidden_size = self.config.num_classes, old.shape[1]
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}")
            sources = [i if i < old_classes else None for i in range(num_classes)]
        if sources is not None:
            bad = [s for s in sources if s is not None and (not isinstance(s, int) or not 0 <= s < old_classes)]
            if not sources or bad:
                raise ValueError(
                    f"`sources` must be a non-empty list of current class ids in [0, {old_classes - 1}] or None, "
                    f"got {bad or sources}"
                )
            mean = old[:old_classes].mean(dim=0)
            weight = torch.stack([old[s] if s is not None else mean for s in sources] + [old[old_classes]])
        if weight.ndim != 2 or weight.shape[0] < 2 or weight.shape[1] != hidden_size:
            raise ValueError(
                f"`weight` must have shape (num_classes + 1, {hidden_size}) with the null class last, "
                f"got {tuple(weight.shape)}"
            )
        embedding = nn.Embedding(weight.shape[0], hidden_size, device=old.device, dtype=old.dtype)
        embedding.weight.copy_(weight.to(device=old.device, dtype=old.dtype))
        embedding.requires_grad_(old.requires_grad).train(self.training)
        self.class_embedding = embedding
        self.register_to_config(num_classes=weight.shape[0] - 1)
        return embedding

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    @property
    def null_class_label(self) -> int:
        """The class label that means "no class" (the unconditional stream of classifier-free guidance)."""
        if not self.is_class_conditional:
            raise ValueError("text-conditioned models have no null class; use the empty prompt's encoding")
        return self.config.num_classes

    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        reuse_state: ENATReuseState | None = None,
        return_dict: bool = True,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_text_embeds: torch.Tensor | None = None,
        conditioning: ENATConditioning | None = None,
        kept_context: ENATKeptContext | None = None,
    ) -> ENATTransformer2DModelOutput | tuple:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, height, width)` or `(batch_size, height * width)`):
                Token ids in `[0, codebook_size]`; `codebook_size` marks masked tokens. Rows may mask different
                numbers of tokens (each row's logits are those of the row run alone).
            class_labels (`torch.LongTensor` of shape `(batch_size,)`):
                Class-conditional models: labels in `[0, num_classes]`; `num_classes` is the null class.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_length, text_embed_dim)`):
                Text-conditioned models: the text encoder's hidden states.
            reuse_state (`ENATReuseState`, *optional*):
                The `reuse_state` returned by the previous step of the same stream. Every token masked now must have
                been masked then. Without it all visible tokens are encoded.
            return_dict (`bool`, defaults to `True`):
                Return an `ENATTransformer2DModelOutput` instead of a tuple.
            encoder_attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                1/True for text tokens to attend to, 0/False for padding.
            pooled_text_embeds (`torch.Tensor` of shape `(batch_size, pooled_text_embed_dim)`):
                The text encoder's pooled embedding; required when the model has `pooled_text_embed_dim`.
            conditioning (`ENATConditioning`, *optional*):
                The `conditioning` returned by an earlier call for the same batch, in place of `class_labels` or the
                text arguments: later sampling steps skip recomputing it.
            kept_context (`ENATKeptContext`, *optional*):
                Tokens kept fixed for the rest of the run (editing), from `prepare_kept_context`: they must be visible
                in `input_ids`; they skip the encoder and every block attends to their stored keys/values.

        Returns:
            `ENATTransformer2DModelOutput` with `logits` of shape `(batch_size, codebook_size, height, width)`, the
            `reuse_state` for the next step and the batch's `conditioning`. As a tuple: `(logits, reuse_state,
            conditioning)`.
        """
        self._check_inputs(
            input_ids,
            class_labels,
            encoder_hidden_states,
            reuse_state,
            encoder_attention_mask,
            pooled_text_embeds,
            conditioning,
            kept_context,
        )
        condition_inputs = (class_labels, encoder_hidden_states, encoder_attention_mask, pooled_text_embeds)
        input_ids = input_ids.reshape(input_ids.shape[0], -1).long()
        masking = input_ids == self.mask_token_id
        kept = None if kept_context is None else self._kept_tokens(kept_context, *input_ids.shape)
        reused = self._reused_tokens(masking, reuse_state)
        if kept is not None:
            reused = reused & ~kept
        # One device sync fetches what the checks of token values need and the per-row counts of every group.
        counts = ENATTokenCounts.fetch(input_ids, masking, reused, class_labels, reuse_state, kept)
        self._check_token_values(counts, class_labels is not None)
        groups = ENATTokenGroups.from_masks(
            masking, reused, counts.masked, counts.reused, kept, counts.kept if kept is not None else None
        )
        if conditioning is None:
            conditioning = self._build_conditioning(*condition_inputs)
        tokens = self.embed(input_ids)
        features = self._encode_decode(tokens, groups, conditioning, reuse_state, kept_context)
        logits = self.head(features, self.embed.word_embedding.weight[: self.config.codebook_size])
        side = self.config.sample_size
        logits = logits.transpose(1, 2).reshape(logits.shape[0], -1, side, side)
        reuse_state = ENATReuseState(features=features, masking=masking)
        if not return_dict:
            return logits, reuse_state, conditioning
        return ENATTransformer2DModelOutput(logits=logits, reuse_state=reuse_state, conditioning=conditioning)

    def prepare_kept_context(
        self,
        reuse_state: ENATReuseState,
        conditioning: ENATConditioning,
        *,
        rows_per_group: int = 1,
    ) -> ENATKeptContext | None:
        """
        Turns the tokens that were visible in a pass into fixed context for the rest of a sampling run (editing: the
        kept tokens of the images, after the first step): their features become the reuse projection of that pass's
        features, and their keys/values at every block are computed once here. Pass the result as `kept_context=` to
        every later step of the stream; the tokens must stay visible. Later steps then spend nothing on them beyond
        attending to their keys/values, where the generation rule (no kept context) projects their features again
        and recomputes their keys/values at every block, every step. The first step after this one gives the same
        logits either way; later steps differ slightly, as the generation rule keeps projecting features that do not
        change.

        Args:
            reuse_state (`ENATReuseState`):
                The state returned by the pass, one row per group: `(num_groups, L, D)` features and `(num_groups, L)`
                masking.
            conditioning (`ENATConditioning`):
                The groups' conditioning (`num_groups` rows, e.g. that pass's `output.conditioning`).
            rows_per_group (`int`, defaults to 1):
                Consecutive batch rows of the later steps that each group serves (samples of one image and stream).

        Returns:
            [`ENATKeptContext`], or None when no token was visible (nothing to keep).

        Memory: `num_blocks * num_kept * 2 * hidden_size` values per group (ENAT-L, 224 kept tokens of 256, fp32:
        42 MiB per image and guidance stream).
        """
        features, masking = reuse_state.features, reuse_state.masking
        if isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int) or rows_per_group < 1:
            raise ValueError(f"`rows_per_group` must be a positive integer, got {rows_per_group!r}")
        self._check_reuse_state_shapes(reuse_state, *masking.shape)
        if conditioning.modulation is None or conditioning.modulation.shape[0] != masking.shape[0]:
            raise ValueError(
                f"`conditioning` must hold the {masking.shape[0]} rows of `reuse_state`, got "
                f"{None if conditioning.modulation is None else conditioning.modulation.shape[0]}"
            )
        num_groups, num_tokens = masking.shape
        masked_counts = masking.sum(1).tolist()
        if min(masked_counts) == num_tokens:
            return None
        # The visible tokens are the pass's encoded group: their raster positions, padded with `num_tokens`.
        groups = ENATTokenGroups.from_masks(masking, torch.zeros_like(masking), masked_counts, [0] * num_groups)
        positions = groups.order[:, : groups.sizes[1]]
        valid = positions < num_tokens
        gathered = torch.gather(
            features.detach(), 1, positions.clamp(max=num_tokens - 1)[..., None].expand(-1, -1, features.shape[2])
        )
        kept_features = self.reuse_proj(gathered).to(features.dtype)
        key_values = torch.stack(
            [
                block.context_key_values(kept_features, conditioning.modulation[:, i])
                for i, block in enumerate(self.blocks)
            ],
            dim=1,
        )
        return ENATKeptContext(
            positions=positions,
            features=kept_features,
            key_values=key_values,
            valid=valid,
            rows_per_group=rows_per_group,
        )

    @staticmethod
    def _kept_tokens(kept_context: ENATKeptContext, batch_size: int, num_tokens: int) -> torch.BoolTensor:
        """Which tokens of each row `kept_context` keeps `(B, L)`."""
        rows = kept_context.for_rows(kept_context.positions)
        kept = torch.zeros(batch_size, num_tokens + 1, dtype=torch.bool, device=rows.device)
        return kept.scatter_(1, rows, True)[:, :num_tokens]

    @property
    def blocks(self) -> list[ENATBlock]:
        """Encoder blocks, then decoder blocks: the order of `ENATConditioning`'s block axis."""
        return [*self.encoder_blocks, *self.decoder_blocks]

    def prepare_conditioning(
        self,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_text_embeds: torch.Tensor | None = None,
    ) -> ENATConditioning:
        """
        The condition of a batch in the form every block consumes it: the adaLN modulation of every block and, for
        text models, the text keys/values of every block. It does not depend on the tokens, so it can be computed
        once and passed as `conditioning=` to every forward call on the same batch (every sampling step; or, in a
        script, the conditional and unconditional streams prepared up front). A forward call with the condition
        arguments computes the same thing and returns it as `output.conditioning`.

        Args:
            class_labels (`torch.LongTensor` of shape `(batch_size,)`):
                Class-conditional models: labels in `[0, num_classes]`; `num_classes` is the null class.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_length, text_embed_dim)`):
                Text-conditioned models: the text encoder's hidden states.
            encoder_attention_mask (`torch.Tensor` of shape `(batch_size, text_length)`, *optional*):
                1/True for text tokens to attend to, 0/False for padding.
            pooled_text_embeds (`torch.Tensor` of shape `(batch_size, pooled_text_embed_dim)`):
                The text encoder's pooled embedding; required when the model has `pooled_text_embed_dim`.

        Returns:
            [`ENATConditioning`] for `batch_size` rows.
        """
        inputs = (class_labels, encoder_hidden_states, encoder_attention_mask, pooled_text_embeds)
        if self.is_class_conditional:
            batch_size = class_labels.numel() if isinstance(class_labels, torch.Tensor) else None
        else:
            batch_size = encoder_hidden_states.shape[0] if isinstance(encoder_hidden_states, torch.Tensor) else None
        self._check_condition_inputs(batch_size, *inputs)
        if self.is_class_conditional:
            label_min, label_max = torch.stack([class_labels.min(), class_labels.max()]).tolist()
            check_class_label_range(label_min, label_max, self.config.num_classes, null_allowed=True)
        return self._build_conditioning(*inputs)

    def _build_conditioning(
        self,
        class_labels: torch.LongTensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        pooled_text_embeds: torch.Tensor | None,
    ) -> ENATConditioning:
        """`prepare_conditioning` without the input checks (`forward` has made them)."""
        embedding, text, text_mask = self._embed_condition(
            class_labels, encoder_hidden_states, encoder_attention_mask, pooled_text_embeds
        )
        modulation = torch.stack([block.modulation(embedding) for block in self.blocks], dim=1)
        text_key_values = None
        if text is not None:
            text_key_values = torch.stack(
                [block.context_key_values(text, modulation[:, i]) for i, block in enumerate(self.blocks)], dim=1
            )
        return ENATConditioning(modulation=modulation, text_key_values=text_key_values, text_mask=text_mask)

    def _embed_condition(
        self,
        class_labels: torch.LongTensor | None,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        pooled_text_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.BoolTensor | None]:
        """Returns the adaLN conditioning `(B, D)`, the projected text tokens `(B, T, D)` and their mask `(B, T)`."""
        if self.is_class_conditional:
            return self.class_embedding(self._drop_labels(class_labels)), None, None
        text = self.context_embedder(encoder_hidden_states)
        text_mask = None if encoder_attention_mask is None else encoder_attention_mask.to(torch.bool)
        if pooled_text_embeds is not None and self.config.pooled_text_embed_dim is not None:
            return self.pooled_text_embedder(pooled_text_embeds), text, text_mask
        if text_mask is None:
            return text.mean(dim=1), text, None
        weights = text_mask.to(text.dtype)[..., None]
        return (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1), text, text_mask

    def _encode_decode(
        self,
        tokens: torch.Tensor,
        groups: ENATTokenGroups,
        conditioning: ENATConditioning,
        reuse_state: ENATReuseState | None,
        kept_context: ENATKeptContext | None = None,
    ) -> torch.Tensor:
        """Runs the blocks on the token groups; returns the final features `(B, L, D)` in raster order."""
        batch_size, num_tokens, width = tokens.shape
        num_reused, num_encoded, num_masked = groups.sizes
        # Padding slots read some real token (discarded later) so that everything they compute stays finite.
        index = groups.order if groups.valid is None else groups.order.clamp(max=num_tokens - 1)
        index = index[..., None].expand(-1, -1, width)
        _, encoded, masked = torch.gather(tokens, 1, index).split(groups.sizes, dim=1)
        prefix_mask, prefix_length = self._prefix_mask(conditioning, kept_context, groups)
        encoder_mask, decoder_mask = groups.attention_masks(prefix_mask, prefix_length)

        reused_features = None
        if num_reused:
            previous = torch.gather(reuse_state.features.detach(), 1, index[:, :num_reused])
            reused_features = self.reuse_proj(previous).to(tokens.dtype)
        if num_encoded:
            for i, block in enumerate(self.encoder_blocks):
                encoded = self._run_block(block, i, encoded, conditioning, reused_features, encoder_mask, kept_context)
        visible = encoded if reused_features is None else torch.cat([reused_features, encoded], dim=1)
        if num_masked:
            context = visible if visible.shape[1] else None
            for i, block in enumerate(self.decoder_blocks, start=len(self.encoder_blocks)):
                masked = self._run_block(block, i, masked, conditioning, context, decoder_mask, kept_context)
        features = torch.cat([visible, masked], dim=1)
        if groups.valid is None and kept_context is None:
            return torch.empty_like(tokens).scatter_(1, index, features)
        # Padding slots all land on one extra position past the grid, which is dropped.
        scattered = tokens.new_empty(batch_size, num_tokens + 1, width)
        if kept_context is not None:
            kept_positions = kept_context.for_rows(kept_context.positions)[..., None].expand(-1, -1, width)
            scattered.scatter_(1, kept_positions, kept_context.for_rows(kept_context.features).to(tokens.dtype))
        return scattered.scatter_(1, groups.order[..., None].expand_as(features), features)[:, :num_tokens]

    @staticmethod
    def _prefix_mask(
        conditioning: ENATConditioning, kept_context: ENATKeptContext | None, groups: ENATTokenGroups
    ) -> tuple[torch.BoolTensor | None, int]:
        """Mask `(B, T + K)` (None: every key counts) and length of the stored keys every block attends to first:
        the text tokens, then the kept tokens."""
        text_length = 0 if conditioning.text_key_values is None else conditioning.text_key_values.shape[2]
        text_mask = conditioning.text_mask
        if kept_context is None:
            return text_mask, text_length
        num_kept = kept_context.positions.shape[1]
        # Rows without padding in their groups keep equally many tokens, so no kept slot is padding either (and no
        # device sync is needed to know it).
        if text_mask is None and groups.valid is None:
            return None, text_length + num_kept
        kept_valid = kept_context.for_rows(kept_context.valid)
        if text_mask is None:
            text_mask = kept_valid.new_ones(groups.order.shape[0], text_length)
        return torch.cat([text_mask, kept_valid], dim=1), text_length + kept_valid.shape[1]

    def _run_block(
        self,
        block: ENATBlock,
        index: int,
        hidden_states: torch.Tensor,
        conditioning: ENATConditioning,
        context: torch.Tensor | None,
        attention_mask: torch.BoolTensor | None,
        kept_context: ENATKeptContext | None = None,
    ) -> torch.Tensor:
        # Fresh contiguous tensors: views into the stacked conditioning or the token groups would make a compiled
        # block (`compile_repeated_blocks`) specialise on their strides and offsets and recompile per block.
        hidden_states = hidden_states.contiguous()
        stored = []
        if conditioning.text_key_values is not None:
            stored.append(conditioning.text_key_values[:, index])
        if kept_context is not None:
            stored.append(kept_context.for_rows(kept_context.key_values[:, index]).to(hidden_states.dtype))
        stored_key_values = torch.cat(stored, dim=1) if len(stored) > 1 else stored[0].clone() if stored else None
        modulation = conditioning.modulation[:, index].clone()
        inputs = (hidden_states, modulation, context, stored_key_values, attention_mask)
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *inputs)
        return block(*inputs)

    def _drop_labels(self, class_labels: torch.LongTensor) -> torch.LongTensor:
        class_labels = class_labels.reshape(-1)
        if self.training and self.config.class_dropout_prob > 0:
            dropped = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            class_labels = class_labels.masked_fill(dropped, self.null_class_label)
        return class_labels

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks (the rules are `enat_diffusers.checks`'): `_check_inputs` runs first in `forward`, without a device
    # sync; `_check_token_values` checks the values fetched with the token counts.

    def _check_inputs(
        self,
        input_ids,
        class_labels,
        encoder_hidden_states,
        reuse_state,
        encoder_attention_mask,
        pooled_text_embeds,
        conditioning,
        kept_context,
    ) -> None:
        """Types and shapes of every `forward` argument."""
        side = self.config.sample_size
        check_token_id_tensor(input_ids)
        grid_ok = input_ids.ndim == 3 and tuple(input_ids.shape[1:]) == (side, side)
        flat_ok = input_ids.ndim == 2 and input_ids.shape[1] == side * side
        if not (grid_ok or flat_ok):
            raise ValueError(
                f"`input_ids` must have shape (batch, {side}, {side}) or (batch, {side * side}) for this model "
                f"(trained on a {side}x{side} token grid), got {tuple(input_ids.shape)}"
            )
        batch_size, num_tokens = input_ids.shape[0], side * side
        condition_inputs = (class_labels, encoder_hidden_states, encoder_attention_mask, pooled_text_embeds)
        if conditioning is not None:
            self._check_conditioning(batch_size, conditioning, condition_inputs)
        else:
            self._check_condition_inputs(batch_size, *condition_inputs)
        if reuse_state is not None:
            self._check_reuse_state_shapes(reuse_state, batch_size, num_tokens)
        if kept_context is not None:
            self._check_kept_context(kept_context, batch_size)

    def _check_condition_inputs(
        self, batch_size, class_labels, encoder_hidden_states, encoder_attention_mask, pooled_text_embeds
    ) -> None:
        """The condition of a class-conditional model (`class_labels`) or a text one (the text arguments)."""
        if self.is_class_conditional:
            if encoder_hidden_states is not None:
                raise ValueError("`encoder_hidden_states` was given, but this model is class-conditional")
            if class_labels is None:
                raise ValueError("`class_labels` is required: a (batch_size,) tensor of labels in [0, num_classes]")
            check_class_label_tensor(class_labels, batch_size)
            return
        if class_labels is not None:
            raise ValueError("`class_labels` was given, but this model is text-conditioned")
        check_text_embeds(
            "encoder_hidden_states", encoder_hidden_states, width=self.config.text_embed_dim, batch_size=batch_size
        )
        check_text_companions(
            "",
            encoder_hidden_states,
            encoder_attention_mask,
            pooled_text_embeds,
            self.config.pooled_text_embed_dim,
            names=("encoder_attention_mask", "pooled_text_embeds"),
        )

    def _check_kept_context(self, kept_context: ENATKeptContext, batch_size: int) -> None:
        if not isinstance(kept_context, ENATKeptContext):
            raise TypeError(
                f"`kept_context` must be the ENATKeptContext of `prepare_kept_context`, got {type(kept_context)}"
            )
        positions, rows_per_group = kept_context.positions, kept_context.rows_per_group
        num_groups = positions.shape[0] if isinstance(positions, torch.Tensor) and positions.ndim == 2 else None
        if num_groups is None or num_groups * rows_per_group != batch_size:
            raise ValueError(
                f"`kept_context` serves {num_groups} groups x {rows_per_group} rows, but the batch has {batch_size} "
                "rows; prepare it for this batch (its rows per group)"
            )
        expected = (num_groups, len(self.blocks), positions.shape[1], 2 * self.config.hidden_size)
        if kept_context.key_values is None or tuple(kept_context.key_values.shape) != expected:
            raise ValueError(f"`kept_context.key_values` must have shape {expected}")

    def _check_token_values(self, counts: "ENATTokenCounts", has_class_labels: bool) -> None:
        """The checks that need tensor values, on the host numbers of `ENATTokenCounts.fetch`."""
        check_token_id_range(counts.id_min, counts.id_max, self.mask_token_id)
        if has_class_labels:
            check_class_label_range(counts.label_min, counts.label_max, self.config.num_classes, null_allowed=True)
        if counts.any_remasked:
            raise ValueError(
                "`reuse_state` does not fit: some tokens masked in `input_ids` were visible in the previous step; "
                "pass the state of the previous step of the same stream, or None"
            )
        if counts.any_kept_masked:
            raise ValueError(
                "`kept_context` does not fit: some of its kept tokens are masked in `input_ids`; a kept context is "
                "for tokens that stay visible for the rest of the run (pass None to encode them as usual)"
            )

    def _check_conditioning(
        self, batch_size: int, conditioning: ENATConditioning, condition_inputs: tuple[torch.Tensor | None, ...]
    ) -> None:
        if any(value is not None for value in condition_inputs):
            raise ValueError(
                "pass either `conditioning` or the condition it was made from (`class_labels`, "
                "`encoder_hidden_states`, `encoder_attention_mask`, `pooled_text_embeds`), not both"
            )
        if not isinstance(conditioning, ENATConditioning):
            raise TypeError(
                f"`conditioning` must be the ENATConditioning of an earlier call, got {type(conditioning)}"
            )
        width = self.config.hidden_size
        expected = (batch_size, len(self.blocks), 8 * width)
        modulation = conditioning.modulation
        if modulation is None or tuple(modulation.shape) != expected:
            got = None if modulation is None else tuple(modulation.shape)
            raise ValueError(f"`conditioning.modulation` must have shape {expected}, got {got}")
        text_key_values = conditioning.text_key_values
        if self.is_class_conditional != (text_key_values is None):
            raise ValueError(
                "`conditioning` was made for a "
                f"{'text-conditioned' if text_key_values is not None else 'class-conditional'} model"
            )
        if text_key_values is not None:
            text_length = text_key_values.shape[2] if text_key_values.ndim == 4 else None
            expected = (batch_size, len(self.blocks), text_length, 2 * width)
            if tuple(text_key_values.shape) != expected:
                raise ValueError(
                    f"`conditioning.text_key_values` must have shape {expected}, got {tuple(text_key_values.shape)}"
                )
            mask = conditioning.text_mask
            if mask is not None and tuple(mask.shape) != (batch_size, text_length):
                raise ValueError(
                    f"`conditioning.text_mask` must have shape {(batch_size, text_length)}, got {tuple(mask.shape)}"
                )

    @staticmethod
    def _reused_tokens(masking: torch.BoolTensor, reuse_state: ENATReuseState | None) -> torch.BoolTensor:
        """Tokens visible now and at the previous step of the stream `(B, L)`: their features are reused."""
        if reuse_state is None:
            return torch.zeros_like(masking)
        return ~(masking | reuse_state.masking.to(masking.device))

    def _check_reuse_state_shapes(self, reuse_state: ENATReuseState, batch_size: int, num_tokens: int) -> None:
        expected_features = (batch_size, num_tokens, self.config.hidden_size)
        features, masking = reuse_state.features, reuse_state.masking
        if features is None or tuple(features.shape) != expected_features:
            got = None if features is None else tuple(features.shape)
            raise ValueError(f"`reuse_state.features` must have shape {expected_features}, got {got}")
        if masking is None or masking.dtype != torch.bool or tuple(masking.shape) != (batch_size, num_tokens):
            got = None if masking is None else (tuple(masking.shape), masking.dtype)
            raise ValueError(
                f"`reuse_state.masking` must be a bool tensor of shape {(batch_size, num_tokens)}, got {got}"
            )
