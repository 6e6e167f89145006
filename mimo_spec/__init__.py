"""mimo-spec: build multimodal in/out models from YAML."""

__version__ = "0.1.0"

__all__ = ["build_model", "build_module", "ConfigError", "MimoError", "__version__"]


def __getattr__(name):
    # Lazy so that `import mimo_spec` stays cheap (the CLI's summary path cares).
    if name in ("build_model", "build_module"):
        from mimo_spec import builders

        return getattr(builders, name)
    if name in ("ConfigError", "MimoError"):
        from mimo_spec import errors

        return getattr(errors, name)
    raise AttributeError(name)
