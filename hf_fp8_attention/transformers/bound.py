"""`BoundMethod`: a method that `prepare_model` stores in one instance's ``__dict__`` (the fused-RoPE forward of an
attention module, the model's ``save_pretrained``), so that a prepared model pickles and deep-copies.

A `types.MethodType` there would not do: it pickles as ``getattr(instance, func.__name__)``, which on
unpickling looks up an attribute the instance does not have (``_fused_rope_forward``) and raises. This one
pickles as (function by its qualified name, instance): the copy's method is bound to the copy's instance.
"""

from __future__ import annotations

import inspect


class BoundMethod:
    """``func`` bound to ``instance``: calling it calls ``func(instance, *args, **kwargs)``.

    ``__func__`` / ``__self__`` as on a bound method, so code that recognises a method by them still does.
    ``func`` must be a module-level function (pickle finds it by its qualified name).
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, func, instance):
        self.__func__ = func
        self.__self__ = instance

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return BoundMethod, (self.__func__, self.__self__)

    @property
    def __signature__(self) -> inspect.Signature:
        parameters = list(inspect.signature(self.__func__).parameters.values())[1:]
        return inspect.Signature(parameters)

    def __repr__(self) -> str:
        owner = f"{type(self.__self__).__name__} at {id(self.__self__):#x}"
        return f"<fp8 attention method {self.__func__.__qualname__} of {owner}>"
