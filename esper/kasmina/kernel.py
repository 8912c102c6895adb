"""The inference kernel Kasmina hands out: an ``nn.Module`` that sends each call to the certified route whose
guards accept it (compiled code, or eager where certification measured eager to be faster), and to the eager
module when no route accepts it."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.modules.module as _nn_module

from esper.artifacts.guards import compile_check, compile_dispatch, compile_predicate
from esper.artifacts.runtime import CompiledPackage
from esper.kasmina import telemetry
from esper.kasmina.base import COMPILED, EAGER, KernelBase
from esper.kasmina.conformance import MODE_QUERIES, mode_problem
from esper.kasmina.regions import Lookup, region_lookup, regions_of
from esper.kasmina.seeds import Weights, bind
from esper.kasmina.unusable import Unusable, refusal_note
from esper.urza import Entry
from esper.urza.evidence import RouteTable

__all__ = ["COMPILED", "EAGER", "BoundKernel", "DeferredPackage", "Kernel", "Route", "route_dispatch"]

Package = Callable[[Sequence[torch.Tensor]], Any]

# nn.Module's process-wide hook tables (private to torch; mutated in place, never rebound, so holding them
# is enough). Kernel.__call__ takes nn.Module's full path whenever one holds a hook: see there. Module globals
# rather than a tuple: the hot path reads each with one cached global load.
_FORWARD_PRE_HOOKS = _nn_module._global_forward_pre_hooks
_FORWARD_HOOKS = _nn_module._global_forward_hooks
_BACKWARD_PRE_HOOKS = _nn_module._global_backward_pre_hooks
_BACKWARD_HOOKS = _nn_module._global_backward_hooks
# The calling thread's dispatch state that eager honours and compiled code would not (one C call each; any
# true: conformance.mode_problem says which).
_AUTOCAST, _FUNCTION_MODES, _DISPATCH_MODES = MODE_QUERIES
_GRAD_ENABLED = torch.is_grad_enabled


class DeferredPackage:
    """A route's package that is verified, loaded and pre-warmed on the first call its route accepts, not at
    load: a bucketed blueprint's first use pays for one package, not for all of them.

    ``load`` does the load path's remaining steps for one entry (signature, size and sha256, then load and
    pre-warm; nothing native runs before the digest checks) and returns the package, or raises
    :class:`Unusable`. It runs once, whichever thread or derived kernel asks first; its outcome (the package,
    or the problem) is kept. The kernel replaces the route's package by the outcome (:meth:`Kernel.forward`).
    """

    def __init__(self, load: Callable[[], Package], label: str):
        self._load = load
        self.label = label
        self._lock = threading.Lock()
        self._outcome: Package | Unusable | None = None

    def resolve(self) -> Package:
        """The loaded package; :class:`Unusable` when a step failed (now or at an earlier call)."""
        with self._lock:
            if self._outcome is None:
                try:
                    self._outcome = self._load()
                except Unusable as u:
                    self._outcome = u
                except Exception as e:  # a verified artifact that still cannot run: eager, never a crash
                    self._outcome = Unusable(telemetry.LOAD_FAILED, f"{self.label}: {type(e).__name__}: {e}")
            outcome = self._outcome
        if isinstance(outcome, Unusable):
            raise outcome
        return outcome

    def __call__(self, args: Sequence[torch.Tensor]) -> Any:
        return self.resolve()(args)

    def __deepcopy__(self, memo: dict[int, Any]) -> DeferredPackage:
        # Copies of a kernel share its packages read-only, the ones still to load included (loaded once).
        return self

    def __repr__(self) -> str:
        state = "pending" if self._outcome is None else type(self._outcome).__name__
        return f"DeferredPackage({self.label}, {state})"


@dataclass(frozen=True)
class Route:
    """One certified entry: its guard check and, unless certification chose eager for it, its package.

    ``table`` is the entry's route by region (:class:`~esper.urza.evidence.RouteTable`): its package serves
    only the calls ``compiled_at`` places in a compiled cell, eager the rest (``None``: compiled everywhere
    its guards accept)."""

    entry: Entry
    check: Callable[[Sequence[Any]], str | None]
    package: Package | None = None
    accepts: Callable[[Sequence[Any]], bool] | None = None
    device_index: int | None = None
    table: RouteTable | None = None
    compiled_at: Lookup | None = None

    @classmethod
    def of(cls, entry: Entry, package: Package | None, *, device_index: int | None = None, own: bool = False) -> Route:
        """The route of ``entry`` (which must have a guard schema), compiled when ``package`` is given.
        ``device_index``: the CUDA device the package was loaded on (its guard refuses tensors on another).
        ``own``: the cells where the entry won on its own, rather than those certification routed to it (see
        :func:`esper.kasmina.regions.region_lookup`)."""
        assert entry.guards is not None
        table, compiled_at = region_lookup(entry, own=own) if package is not None else (None, None)
        return cls(
            entry,
            compile_check(entry.guards, device_index=device_index),
            package,
            compile_predicate(entry.guards, device_index=device_index),
            device_index,
            table,
            compiled_at,
        )

    def with_package(self, package: Package | None) -> Route:
        """The same entry and guards, calling ``package`` instead (``None``: eager)."""
        return dataclasses.replace(self, package=package)

    def everywhere(self) -> Route:
        """The same route serving its package wherever its guards accept, whatever its table says."""
        return dataclasses.replace(self, table=None, compiled_at=None)

    @property
    def path(self) -> str:
        return COMPILED if self.package is not None else EAGER

    @property
    def regional(self) -> bool:
        """Whether the package serves only some regions of the profile (eager elsewhere, by evidence)."""
        return self.package is not None and self.compiled_at is not None

    def describe(self) -> str:
        """``"default/default->compiled#3"``; a regional route says in how many of its cells."""
        path = f"{self.path} ({self.table.describe()})" if self.regional and self.table is not None else self.path
        return f"{self.entry.profile}/{self.entry.variant}->{path}#{self.entry.id}"

    @property
    def deferred(self) -> bool:
        """Whether the package loads on the first call this route accepts (it is not loaded yet)."""
        return type(self.package) is DeferredPackage


def route_dispatch(
    routes: Sequence[Route], *, fast: bool = False, runners: Sequence[object | None] = ()
) -> Callable[[Sequence[Any]], Any]:
    """The index of the first of ``routes`` whose guards accept the arguments into a compiled cell (every
    accepted call, for a route without a table); where routes accept it only outside their compiled cells, the
    first of them plus ``len(routes)`` (eager by evidence; the generated dispatcher then checks the sizes only);
    ``-1`` where none accepts. Routes of one profile that share its cells between them (each compiled where
    certification chose it) have the same guards: a call goes to the one whose cell it is. ``fast``: plus
    ``2 * len(routes)`` instead when the call is in a compiled cell and compiled code may serve it with no
    further check of the calling thread or the inputs' layout (see
    :func:`esper.artifacts.guards.compile_dispatch`); where ``runners[index]`` is given, that answer is
    ``runners[index]`` itself, not an index.

    The routes of one blueprint version differ only in their shape profiles' ranges, so one generated
    dispatcher checks them all, route tables included (:func:`esper.artifacts.guards.compile_dispatch`): a call
    to the second bucket costs what a call to the first does, and a regional route's cell is looked up from the
    sizes the guards just read. Routes that differ otherwise try each route's own predicate in turn."""
    schemas = [r.entry.guards for r in routes]
    devices = {r.device_index for r in routes}
    guarded = all(s is not None for s in schemas) and all(r.accepts is not None for r in routes)
    if routes and guarded and len(devices) == 1:
        regions = [
            regions_of(r.table, r.entry.guards) if r.regional and r.table is not None else None  # type: ignore[arg-type]
            for r in routes
        ]
        # A table the guards cannot place has no lookup either (Route.of): such a route is not regional.
        if all(g is not None or not r.regional for g, r in zip(regions, routes, strict=True)):
            dispatch = compile_dispatch(
                schemas,  # type: ignore[arg-type]
                device_index=devices.pop(),
                regions=regions,
                fast=fast,
                runners=runners,
            )
            if dispatch is not None:
                return dispatch
    plain = tuple(routes)

    def each(args: Sequence[Any]) -> int:
        return first_serving(plain, args, lambda r: r.accepts is not None and r.accepts(args))

    return each


def first_serving(
    routes: Sequence[Route], args: Sequence[Any], accepts: Callable[[Route], bool], *, start: int = 0
) -> int:
    """:func:`route_dispatch`'s answer found route by route: the first of ``routes`` that ``accepts`` the call
    into a compiled cell, else the first accepting one plus ``len(routes)``, else ``-1``. ``start``: the routes
    before it are known to refuse the call (they are not asked again)."""
    found = -1
    for index in range(start, len(routes)):
        r = routes[index]
        if accepts(r):
            if not r.regional or r.compiled_at(args):  # type: ignore[misc]
                return index
            if found < 0:
                found = len(routes) + index
    return found


class Kernel(KernelBase):
    """A blueprint's inference kernel.

    ``route`` is ``"compiled"`` when at least one compiled route is loaded, and ``reason`` says why (or why
    not). Routes come from disjoint shape profiles, except those sharing one profile's cells (same guards,
    each compiled in its own cells) and exact-size specializations (routed first): dispatch is the first route
    that accepts a call into a compiled cell. A kernel without a compiled route serves every call eager without
    checking the arguments: there is nothing to refuse them for. The eager module is built only when a call needs
    it. A kernel bound to a seed's weights (:meth:`bind`) is *derived* from its ``origin``, the kernel Kasmina
    loaded.
    """

    _origin: Kernel | None
    _route_of: Callable[[Sequence[Any]], int]
    # Whether the dispatcher answers calls it finds plain in one C call (route_dispatch's ``fast``): the hot
    # path then skips its own thread checks. A seed's kernel checks its seed on every call whatever it answers.
    _fast_dispatch = True

    def __init__(
        self,
        blueprint: str,
        *,
        eager_factory: Callable[[], torch.nn.Module],
        routes: Sequence[Route] = (),
        reason: str,
        origin: Kernel | None = None,
        refused: Sequence[Unusable] = (),
    ):
        super().__init__(blueprint, reason=reason)
        # Profiles whose Urza row was refused at load: a call outside every route is told so (see _explain).
        self.refused_note = refusal_note(refused)
        self.routes = tuple(routes)
        self._eager_factory = eager_factory
        # Kasmina's own eager module, kept out of ``_modules`` (see eager_module).
        self._eager: torch.nn.Module | None = None
        # Set past nn.Module.__setattr__: the origin is no submodule (its weights are not this kernel's).
        object.__setattr__(self, "_origin", origin)

    @property
    def routes(self) -> tuple[Route, ...]:
        """The certified routes, in dispatch order."""
        return self.__dict__["_routes"]

    @routes.setter
    def routes(self, routes: Sequence[Route]) -> None:
        # The dispatchers, runners and the compiled flag follow the routes wherever they are set (written past
        # nn.Module.__setattr__: plain attributes the hot path reads from the instance dict), a deferred route's
        # package loaded later included. The hot path's dispatcher (``_call_of``) answers a plain call into a
        # loaded package's compiled cell with the package's runner; ``_route_of`` answers indices only.
        routes = tuple(routes)
        runs = tuple(_runner_of(r.package) for r in routes)
        route_of = route_dispatch(routes, fast=self._fast_dispatch)
        loaded = [r if type(r) is not DeferredPackage else None for r in runs]
        self.__dict__.update(
            _routes=routes,
            _route_of=route_of,
            _call_of=route_dispatch(routes, fast=True, runners=loaded)
            if self._fast_dispatch and any(loaded)
            else route_of,
            _count=len(routes),
            _verified=2 * len(routes),
            _runs=runs,
            _serves_compiled=any(r.package is not None for r in routes),
        )

    @property
    def route(self) -> str:
        return COMPILED if any(r.package is not None for r in self.routes) else EAGER

    @property
    def entry(self) -> Entry | None:
        """The first compiled route's entry (``None`` when nothing compiled is loaded)."""
        return next((r.entry for r in self.routes if r.package is not None), None)

    @property
    def origin(self) -> Kernel:
        """The kernel Kasmina loaded that this one was derived from (itself when it was not derived)."""
        return self._origin or self

    def eager_module(self) -> torch.nn.Module:
        """The eager module (built on first use, in eval mode).

        It is Kasmina's, not the user's: set past ``nn.Module.__setattr__`` so that it is no submodule, in
        neither the host's state dict nor its ``train()``/``eval()``, as the compiled code has no state there."""
        eager = self._eager
        if eager is None:
            eager = self._eager_factory().eval()
            self.__dict__["_eager"] = eager
        return eager

    def build_eager(self) -> torch.nn.Module:
        """A fresh eager module from this kernel's factory (not cached; :meth:`eager_module` is)."""
        return self._eager_factory()

    def derive(self, *, routes: Sequence[Route], eager_factory: Callable[[], torch.nn.Module], reason: str) -> Kernel:
        """A new kernel of the same blueprint with other routes and another eager module, derived from this
        kernel's origin (deriving from a derived kernel derives from the loaded one)."""
        return Kernel(self.blueprint, eager_factory=eager_factory, routes=routes, reason=reason, origin=self.origin)

    def select(self, args: Sequence[Any]) -> tuple[Route | None, str | None]:
        """The route that accepts ``args``, or ``None`` and why none does."""
        index = self._route_of(args) if self.routes else -1
        if index >= 0:
            return self.routes[index % len(self.routes)], None
        return self._explain(args)

    def _explain(self, args: Sequence[Any]) -> tuple[Route | None, str | None]:
        """Why no route accepts ``args`` (after the dispatcher refused them): each route's readable check."""
        why = None
        for r in self.routes:
            why = r.check(args)
            if why is None:
                return r, None
        if len(self.routes) > 1:
            why = f"no certified shape profile accepts the inputs (last refusal: {why})"
        note = self.origin.refused_note
        if why is not None and note is not None:
            why = f"{why}; {note}"
        return None, why

    def check(self, *args: Any) -> str | None:
        """Why no route would accept ``args`` (``None``: one does)."""
        return self.select(args)[1] if self.routes else "no certified route"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The hot path of every call, kept flat (see benchmarks/floor.py). nn.Module.__call__ costs about as much
        # as the guard (a JIT tracing-state query and eight hook-table checks): with no hook anywhere and no
        # ``Module.compile()``, serve the call here. Any hook (on this kernel or process-wide) or a compiled call
        # takes nn.Module's own path, unchanged. Attributes are read from the instance dict: nn.Module's
        # __getattr__ makes every ``self.name`` a slow lookup.
        d = self.__dict__
        if (
            kwargs
            or d["_forward_pre_hooks"]
            or d["_forward_hooks"]
            or d["_backward_pre_hooks"]
            or d["_backward_hooks"]
            or "_compiled_call_impl" in d  # set on the instance by Module.compile() only
            or _FORWARD_PRE_HOOKS
            or _FORWARD_HOOKS
            or _BACKWARD_PRE_HOOKS
            or _BACKWARD_HOOKS
        ):
            return self._module_call(args, kwargs)
        if d["_serves_compiled"]:
            index = d["_call_of"](args)
            if type(index) is not int:
                # The runner of a loaded package: the call is in its compiled cell, and the dispatcher found the
                # inputs contiguous and plain, and this thread plain (no grad, autocast, mode or transform).
                d["last_path"] = COMPILED
                d["compiled_calls"] += 1
                return index(args)[0]
            if index >= d["_verified"]:
                # The same, where the route's package is still to load (or the route is certified eager).
                if d["_runs"][index - d["_verified"]] is not None:
                    return self._serve(d, args, index)
            elif 0 <= index < d["_count"]:
                run = d["_runs"][index]
                if run is not None:
                    # The accepted call with nothing unusual: a loaded package, no mode, no graph. Anything else
                    # (a package still to load, a mode, grad) is _serve's, which decides the same and says why.
                    if (
                        type(run) is not DeferredPackage
                        and not (_AUTOCAST() or _FUNCTION_MODES() or _DISPATCH_MODES())
                        and not (_GRAD_ENABLED() and _any_requires_grad(args))
                    ):
                        for a in args:
                            if not a.is_contiguous():
                                args = tuple(a.contiguous() for a in args)
                                break
                        d["last_path"] = COMPILED
                        d["compiled_calls"] += 1
                        return run(args)[0]
                    return self._serve(d, args, index)
            elif index < 0:  # no route accepts: _serve looks again and says why
                return self._serve(d, args, index)
            # Certified eager for this profile, as _serve would, with nothing to say; or past the routes:
            # accepted where certification measured eager faster (eager by evidence). Both below.
        # Eager: by evidence, or with nothing compiled to route to (without checking the arguments: see
        # _serve). The process-wide hook tables were just found empty: only the eager module's own are left
        # for _run_eager's test.
        d["last_path"] = EAGER
        d["eager_calls"] += 1
        eager = d["_eager"]
        if eager is None:
            eager = self.eager_module()
        e = eager.__dict__
        try:
            plain = not (
                e["_forward_pre_hooks"]
                or e["_forward_hooks"]
                or e["_backward_pre_hooks"]
                or e["_backward_hooks"]
                or "_compiled_call_impl" in e
            )
        except KeyError:  # a module that keeps its state elsewhere (a ScriptModule): its own __call__ decides
            plain = False
        return eager.forward(*args) if plain else eager(*args)

    def _module_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call the hot path leaves alone: nn.Module's own path where a hook or ``Module.compile()`` is set,
        else ``forward`` (keyword arguments)."""
        d = self.__dict__
        if (
            d["_forward_pre_hooks"]
            or d["_forward_hooks"]
            or d["_backward_pre_hooks"]
            or d["_backward_hooks"]
            or "_compiled_call_impl" in d
            or _FORWARD_PRE_HOOKS
            or _FORWARD_HOOKS
            or _BACKWARD_PRE_HOOKS
            or _BACKWARD_HOOKS
        ):
            return torch.nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Kernel:
        # nn.Module's own deepcopy goes through pickling, which a loaded package refuses. A copy shares what is
        # read-only (packages, guards, its origin, its source) and copies the rest: its own seed module, whose
        # tensors its compiled path then follows (an EMA update of the copy leaves the original alone). What the
        # routes setter derives (the runners, and the dispatcher that hands them out) is derived again from the
        # copy's own routes, whose packages may be the copy's own.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in _DERIVED:
                new.__dict__[key] = value if key in _SHARED else copy.deepcopy(value, memo)
        new.routes = new.__dict__["_routes"]
        return new

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            positional = self.positional(self.routes[0].entry.guards if self.routes else None, args, kwargs)
            if positional is None:
                self.took(EAGER)
                return self.eager_module()(*args, **kwargs)
            args = positional
        return self._serve(self.__dict__, args)

    def _accepted(self, args: tuple[Any, ...]) -> int:
        """What the dispatcher said no to, looked at again with each route's readable check (the cold path):
        the dispatcher's code for the route that accepts after all, else ``-1`` with one WARNING saying why."""
        route, why = self._explain(args)
        if route is None:
            if why is not None:
                self.warn_once(telemetry.OUTSIDE_GUARDS, f"{why}; this call runs eager")
            return -1
        # _explain asked each route in order up to the one that accepts: only the later ones are left to ask.
        return first_serving(
            self.routes, args, lambda r: r is route or r.check(args) is None, start=self.routes.index(route)
        )

    def _serve(self, d: dict[str, Any], args: tuple[Any, ...], index: int | None = None) -> Any:
        # Every call __call__'s hot path does not finish (``index``: the dispatcher's answer, when it asked).
        # A kernel without a compiled route serves everything eager: nothing to check the arguments for.
        if d["_serves_compiled"]:
            if index is None:
                index = d["_route_of"](args)
            if index >= d["_verified"]:
                index -= d["_verified"]  # the hot path's shortcut: this path checks everything itself
            if index < 0:
                index = self._accepted(args)
            # ``index`` past the routes: accepted where certification measured eager faster (eager by evidence,
            # no WARNING); ``-1``: no route accepts.
            if 0 <= index < d["_count"]:
                route = d["_routes"][index]
                package = route.package
                if package is None:
                    pass  # certified eager for this profile
                elif _AUTOCAST() or _FUNCTION_MODES() or _DISPATCH_MODES() or _FORWARD_PRE_HOOKS or _FORWARD_HOOKS:
                    self.warn_once(telemetry.MODE, f"{mode_problem()}; this call runs eager")
                elif _GRAD_ENABLED() and _any_requires_grad(args):
                    self.warn_once(telemetry.NEEDS_GRAD, "inputs require grad and this artifact has no backward")
                else:
                    if type(package) is DeferredPackage:
                        package = self._resolve(route)
                    if package is not None:
                        for a in args:
                            if not a.is_contiguous():
                                args = tuple(a.contiguous() for a in args)
                                break
                        d["last_path"] = COMPILED
                        d["compiled_calls"] += 1
                        return package(args)
        d["last_path"] = EAGER
        d["eager_calls"] += 1
        eager = d["_eager"]
        return _run_eager(eager if eager is not None else self.eager_module(), args)

    def _resolve(self, route: Route) -> Package | None:
        """Load a deferred route's package (first call it accepts) and put the outcome in its place: the
        package, or eager for that route, with one WARNING naming the step that failed."""
        assert isinstance(route.package, DeferredPackage)
        try:
            package: Package | None = route.package.resolve()
        except Unusable as u:
            self.warn_once(u.code, f"{u.detail}; profile {route.entry.profile} runs eager")
            package = None
        self.routes = tuple(route.with_package(package) if r is route else r for r in self.routes)
        return package

    def resolve_all(self) -> None:
        """Load every deferred route now (what :meth:`bind` needs, and a caller that wants no first-call cost)."""
        for route in self.routes:
            if route.deferred:
                self._resolve(route)

    def bind(self, weights: Weights) -> BoundKernel:
        """This kernel's compiled code with a seed's own weights (its module, or a state dict): a new kernel
        whose submodule ``seed`` is the seed's module. Names, shapes and dtypes are checked first; see
        :mod:`esper.kasmina.seeds`. Deferred routes are loaded first (a seed shares the loaded package)."""
        origin = self.origin
        origin.resolve_all()
        module, wire = bind(self, weights)
        return BoundKernel(origin, module, wire)

    def ignore_route_tables(self) -> None:
        """Serve every route's package wherever its guards accept, whatever its route table says: what
        certification measures (it times the compiled code itself, at every point of the grid)."""
        self.routes = tuple(r.everywhere() for r in self.routes)

    def extra_repr(self) -> str:
        routes = ", ".join(r.describe() for r in self.routes)
        return f"{self.blueprint!r}, route={self.route}, routes=[{routes}], reason={self.reason!r}"


# What a copy of a kernel shares with the original rather than copies (see Kernel.__deepcopy__).
_SHARED = frozenset({"_origin", "source", "_eager_factory"})
# What the routes setter derives from the routes (see Kernel.__deepcopy__).
_DERIVED = frozenset({"_route_of", "_call_of", "_count", "_verified", "_runs", "_serves_compiled"})


class BoundKernel(Kernel):
    """A kernel running its origin's compiled code with one seed's weights (:meth:`Kernel.bind`).

    ``seed`` is the seed's module, a submodule: the user's state, in the host's state dict and mode switches.
    Every call checks that the seed is still what the compiled code computes (see :mod:`esper.kasmina.seeds`);
    a call that is not, or that no route accepts, runs ``seed`` itself.
    """

    def __init__(
        self, origin: Kernel, seed: torch.nn.Module, wire: Callable[[dict[str, torch.nn.Module]], Sequence[Route]]
    ):
        super().__init__(
            origin.blueprint, eager_factory=origin.build_eager, reason=f"{origin.reason}; seed weights", origin=origin
        )
        self.seed = seed
        self.routes = tuple(wire(self._modules))  # type: ignore[arg-type]
        self.source = origin.source
        # Nothing is said at bind: a seed bound in train mode is usually put in eval mode before its first call.
        # The first call that runs eager says why.

    _fast_dispatch = False

    def eager_module(self) -> torch.nn.Module:
        """The seed's own module: what a call the compiled code may not take runs."""
        return self.seed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Kernel.__call__'s hook test (see there); every call then takes this class's _serve, with the seed's checks.
        d = self.__dict__
        if (
            kwargs
            or d["_forward_pre_hooks"]
            or d["_forward_hooks"]
            or d["_backward_pre_hooks"]
            or d["_backward_hooks"]
            or "_compiled_call_impl" in d
            or _FORWARD_PRE_HOOKS
            or _FORWARD_HOOKS
            or _BACKWARD_PRE_HOOKS
            or _BACKWARD_HOOKS
        ):
            return self._module_call(args, kwargs)
        return self._serve(d, args)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            positional = self.positional(self.routes[0].entry.guards if self.routes else None, args, kwargs)
            if positional is None:
                self.took(EAGER)
                return self.seed(*args, **kwargs)
            args = positional
        return self._serve(self.__dict__, args)

    def _serve(self, d: dict[str, Any], args: tuple[Any, ...], index: int | None = None) -> Any:
        # Kernel._serve with the seed's checks (see there).
        if d["_serves_compiled"]:
            if index is None:
                index = d["_route_of"](args)
            if index < 0:
                index = self._accepted(args)
            if 0 <= index < d["_count"]:
                package = d["_routes"][index].package
                if package is None:
                    pass  # certified eager for this profile, or for seeds
                elif _AUTOCAST() or _FUNCTION_MODES() or _DISPATCH_MODES() or _FORWARD_PRE_HOOKS or _FORWARD_HOOKS:
                    self.warn_once(telemetry.MODE, f"{mode_problem()}; this call runs eager")
                else:
                    # First: a seed that changed is validated again, and the grad check then sees its tensors now.
                    problem = package.problem()
                    if torch.is_grad_enabled() and (_any_requires_grad(args) or package.seed_requires_grad()):
                        self.warn_once(
                            telemetry.NEEDS_GRAD, "a graph through the inputs or the seed's weights needs eager"
                        )
                    elif problem is not None:
                        self.warn_once(problem[0], f"{problem[1]}; this call runs eager")
                    else:
                        for a in args:
                            if not a.is_contiguous():
                                args = tuple(a.contiguous() for a in args)
                                break
                        d["last_path"] = COMPILED
                        d["compiled_calls"] += 1
                        return package(args)
        d["last_path"] = EAGER
        d["eager_calls"] += 1
        return _run_eager(d["_modules"]["seed"], args)


def _run_eager(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    """``module(*args)``. nn.Module.__call__ costs more than this kernel's own dispatch: where it would only
    call ``forward`` (no hook on the module or process-wide, no ``Module.compile()``: what it checks itself),
    call ``forward`` here; anything else takes nn.Module's own path. Submodules are called as usual."""
    d = module.__dict__
    try:
        plain = not (
            d["_forward_pre_hooks"]
            or d["_forward_hooks"]
            or d["_backward_pre_hooks"]
            or d["_backward_hooks"]
            or "_compiled_call_impl" in d
            or _FORWARD_PRE_HOOKS
            or _FORWARD_HOOKS
            or _BACKWARD_PRE_HOOKS
            or _BACKWARD_HOOKS
        )
    except KeyError:  # a module that keeps its state elsewhere (a ScriptModule): its own __call__ decides
        plain = False
    return module.forward(*args) if plain else module(*args)


def _runner_of(package: Package | None) -> Callable[[Sequence[torch.Tensor]], Sequence[Any]] | Package | None:
    """What the hot path calls for ``package``: a loaded package's boxed runner (``run(args)[0]`` is its output;
    no attribute lookups), else the package itself (``None``: eager; a :class:`DeferredPackage` is left for
    _serve to load)."""
    if isinstance(package, CompiledPackage):
        return package.boxed_runner
    if package is None or type(package) is DeferredPackage:
        return package
    call = package

    def boxed(args: Sequence[torch.Tensor]) -> tuple[Any]:
        return (call(args),)

    return boxed


def _any_requires_grad(args: tuple[Any, ...]) -> bool:
    # A loop, not any() over a generator: the generator costs more than the check on the hot path.
    for a in args:  # noqa: SIM110
        if a.requires_grad:
            return True
    return False
