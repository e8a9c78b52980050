"""Forward hooks on the modules of resolved sites, shared by every object that reads or replaces activations.

`SiteHooks` registers one hook per site (a forward pre-hook for input sites, a forward hook for output sites)
and removes them all on `close` or when its `with` block ends; `RecordingHooks` adds the read-only hooks that hand
each site's hidden states to `_record` while a call is in progress, so other forwards of the same model are
unaffected."""

from abc import ABC, abstractmethod
from functools import partial
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn

from actstore.transforms.sites import SiteSpec, first_tensor


class SiteHooks(ABC):
    """Hooks on the sites' modules; a context manager that removes them."""

    _handles: list[torch.utils.hooks.RemovableHandle]

    def _register(self, model: nn.Module, specs: list[SiteSpec]) -> None:
        modules = dict(model.named_modules())
        self._handles = [
            modules[spec.module].register_forward_pre_hook(partial(self._on_input, spec), with_kwargs=True)
            if spec.io == "input"
            else modules[spec.module].register_forward_hook(partial(self._on_output, spec))
            for spec in specs
        ]

    @abstractmethod
    def _on_input(self, spec: SiteSpec, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward pre-hook of an input site; a non-None return replaces `(args, kwargs)`."""

    @abstractmethod
    def _on_output(self, spec: SiteSpec, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook of an output site; a non-None return replaces the output."""

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RecordingHooks(SiteHooks):
    """Read-only hooks: while `_active`, every site's hidden states go to `_record`."""

    _active = False

    def _on_input(self, spec: SiteSpec, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active:
            # HF passes the hidden states positionally in most families, by keyword in some.
            self._record(spec, args[0] if args else kwargs["hidden_states"])

    def _on_output(self, spec: SiteSpec, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        if self._active:
            self._record(spec, first_tensor(output))

    @abstractmethod
    def _record(self, spec: SiteSpec, value: torch.Tensor | None) -> None:
        """Keep one site's hidden states of the current call."""
