"""Configuration of nanomoe / nanoMoE GPT models (model_type "nanomoe_gpt").

Written by nanomoe next to every MoE model it saves, so that
`transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it.
"""
from transformers import PretrainedConfig


class GPTConfig(PretrainedConfig):
    model_type = "nanomoe_gpt"
    attribute_map = {
        "num_hidden_layers": "n_layer",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        block_size=1024,
        vocab_size=50304,
        n_layer=12,
        n_head=12,
        n_embd=768,
        dropout=0.0,
        bias=True,
        # The architecture: nanomoe writes every one of these keys.
        norm_type="layernorm",  # "layernorm" (GPT-2) | "rmsnorm" (the seed: weight only)
        layer_norm_epsilon=1e-5,
        qk_norm=False,  # RMS-normalise q and k per head (the seed)
        activation_function="gelu",  # "gelu_new" | "gelu" (exact) | "relu2" (the seed)
        expert_mlp="mlp",  # "mlp" | "swiglu" (the seed's use_qwen3_moe_mlp)
        n_exp=1,
        moe_top_k=None,
        stride=1,
        moe_placement="end",  # "end": MoE at (i + 1) % stride == 0; "start": i % stride == 0
        moe_start_layer=0,
        use_aux_loss=False,
        aux_loss_weight=0.01,
        use_router_z_loss=False,
        router_z_loss_weight=0.001,
        use_router_ortho_loss=False,
        router_ortho_loss_weight=0.01,
        router_ortho_neg_corr_weight=1.0,
        use_experts_ortho_loss=False,
        experts_ortho_loss_weight=0.01,
        use_gate_output_loss=False,
        gate_output_loss_weight=0.01,
        use_noisy_top_k=False,
        train_capacity=1.25,
        eval_capacity=2.0,
        min_capacity=4,
        use_switch_tfm_init=False,
        switch_tfm_init_scale=1.0,
        router_use_full_prec=False,
        **kwargs,
    ):
        # Older nanoMoE configs call moe_top_k "top_k"; never keep that name, since
        # transformers would copy it into the generation config and sample with it.
        legacy = kwargs.pop("top_k", None)
        if legacy is not None and moe_top_k is not None and legacy != moe_top_k:
            raise ValueError(f"both moe_top_k ({moe_top_k}) and its legacy name top_k ({legacy}) are set and differ")
        moe_top_k = moe_top_k if moe_top_k is not None else (legacy if legacy is not None else 2)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.bias = bias
        qwen3 = kwargs.pop("use_qwen3_moe_mlp", None)  # the seed's name for SwiGLU experts
        if qwen3 is not None and (expert_mlp == "swiglu") != bool(qwen3):
            raise ValueError(f"use_qwen3_moe_mlp ({qwen3}) contradicts expert_mlp ({expert_mlp!r})")
        self.norm_type = norm_type
        self.layer_norm_epsilon = layer_norm_epsilon
        self.qk_norm = qk_norm
        self.activation_function = activation_function
        self.expert_mlp = expert_mlp
        self.use_qwen3_moe_mlp = expert_mlp == "swiglu"
        self.n_exp = n_exp
        self.moe_top_k = moe_top_k
        self.stride = stride
        self.moe_placement = moe_placement
        self.moe_start_layer = moe_start_layer
        self.use_aux_loss = use_aux_loss
        self.aux_loss_weight = aux_loss_weight
        self.use_router_z_loss = use_router_z_loss
        self.router_z_loss_weight = router_z_loss_weight
        self.use_router_ortho_loss = use_router_ortho_loss
        self.router_ortho_loss_weight = router_ortho_loss_weight
        self.router_ortho_neg_corr_weight = router_ortho_neg_corr_weight
        self.use_experts_ortho_loss = use_experts_ortho_loss
        self.experts_ortho_loss_weight = experts_ortho_loss_weight
        self.use_gate_output_loss = use_gate_output_loss
        self.gate_output_loss_weight = gate_output_loss_weight
        self.use_noisy_top_k = use_noisy_top_k
        self.train_capacity = train_capacity
        self.eval_capacity = eval_capacity
        self.min_capacity = min_capacity
        self.use_switch_tfm_init = use_switch_tfm_init
        self.switch_tfm_init_scale = switch_tfm_init_scale
        self.router_use_full_prec = router_use_full_prec
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
