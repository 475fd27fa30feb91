"""The composed model: base encoder, MoE trunk, branches; compose and verify."""
