"""ml_collections configs (`get_config(arg)`), installed as `cgn_jax.configs`."""
