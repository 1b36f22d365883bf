"""Useful FLOPs of one LoRA training step, counted the same way for both trainers.

    forward  = 2 * tokens * W                          W: weights of the decoder layers' linear
                                                          projections (q, k, v, o, gate, up, down)
             + 2 * label_positions * vocab * hidden    LM head, only where a loss is taken
             + 2 * 2 * batch * heads * seq^2 * head_dim * layers   attention scores and values
    backward = forward again: input gradients only (the base is frozen: no weight gradients; LoRA's
               own FLOPs are < 1 % and not counted)

The embedding lookup is not FLOPs. Work a trainer does beyond this (recomputation, the LM head on
positions without a label) is not useful and does not count. Known approximations, each under 1 %
of the total: the attention term is the dense seq^2 (causal masking makes half of it useless, and
its backward needs gradients for both operands, i.e. twice the forward), and the backward counts
the first layer's q/k/v input gradients, which only the frozen embedding would consume.
"""

from __future__ import annotations

FORMULA = ("forward = 2*tokens*W_proj + 2*label_positions*vocab*hidden + 2*2*B*heads*T^2*head_dim*layers; "
           "backward = forward (input gradients only; frozen base)")


def decoder_linear_weights(frozen: list) -> tuple[int, int]:
    """(number of matrices, their parameters): every 2-D frozen tensor inside a decoder layer."""
    mats = [t for t in frozen if len(t.shape) == 2 and ".layers." in t.graph_name]
    total = 0
    for t in mats:
        total += t.shape[0] * t.shape[1]
    return len(mats), total


def useful_flops(config: dict, linear_weights: int, batch: int, seq: int, label_positions: int) -> dict[str, float]:
    """Per-step FLOP counts by part; ``total`` = forward + backward."""
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    tokens = batch * seq
    parts = {
        "projections": 2.0 * tokens * linear_weights,
        "lm_head": 2.0 * label_positions * config["vocab_size"] * hidden,
        "attention": 2.0 * 2 * batch * heads * seq * seq * head_dim * layers,
    }
    forward = sum(parts.values())
    return {**parts, "forward": forward, "backward": forward, "total": 2 * forward}
