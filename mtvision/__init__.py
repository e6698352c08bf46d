"""mtvision: multi-task vision pre-training on a shared backbone."""
__version__ = '0.1.0'

__all__ = ['get_model', 'list_models', 'load_model', 'predict']


def __getattr__(name: str):
    # the model zoo's entry points and predict, imported on first use so that `import mtvision` stays light (no torch)
    if name == 'predict':
        from mtvision.inference import predict
        return predict
    if name in __all__:
        from mtvision.zoo import api
        return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
