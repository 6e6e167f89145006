"""Hugging Face interop: import checkpoints into mimo-spec and export them back.

``import_hf(path_or_model) -> (cfg, model)``, ``import_hf_to_dir(source, out_dir)``,
``load_imported(out_dir)`` and ``export_hf(model, cfg, out_dir)``. Imported lazily,
so ``import mimo_spec`` never pulls in transformers or safetensors.
"""

__all__ = ["import_hf", "import_hf_to_dir", "load_imported", "export_hf", "SUPPORTED"]


def __getattr__(name):
    if name in ("import_hf", "import_hf_to_dir", "load_imported", "SUPPORTED"):
        from mimo_spec.interop import hf_import

        return getattr(hf_import, name)
    if name == "export_hf":
        from mimo_spec.interop.hf_export import export_hf

        return export_hf
    raise AttributeError(f"module 'mimo_spec.interop' has no attribute {name!r}")
