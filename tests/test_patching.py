"""The one forward-swap mechanism: exact undo, stacking, deep copies with their own swaps, pickling, state dicts,
and copies of a function with one global of its own."""

import copy
import inspect
import io
import pickle
import sys

import pytest
import torch

from vlmtune.patching import restore, swap_forward, swap_of, swapped_modules, with_global

KEY = "_vlmtune_test"
OUTER = "_vlmtune_test_outer"


def doubled(module, x):
    return 2 * swap_of(module, KEY).inner(x)


def plus_data(module, x):
    return swap_of(module, OUTER).inner(x) + swap_of(module, OUTER).data


def _linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_swap_changes_the_instance_only_and_undo_restores_the_same_object():
    module, other = _linear(), _linear()
    x = torch.randn(2, 4)
    want = module(x)
    undo = swap_forward(module, KEY, doubled)
    assert torch.equal(module(x), 2 * want)
    assert torch.equal(other(x), want)  # the class and other instances are untouched
    assert swapped_modules(module, KEY) == [""]
    undo()
    assert "forward" not in module.__dict__ and KEY not in module.__dict__
    assert torch.equal(module(x), want)
    undo()  # idempotent


def test_an_instance_forward_that_was_there_comes_back_as_the_same_object():
    module = _linear()
    own = module.forward  # a bound method stored on the instance, as accelerate's hooks leave one
    module.forward = own
    undo = swap_forward(module, KEY, doubled)
    undo()
    assert module.__dict__["forward"] is own


def test_swaps_stack_and_undo_in_reverse_order():
    module = _linear()
    x = torch.randn(2, 4)
    want = module(x)
    undo_inner = swap_forward(module, KEY, doubled)
    undo_outer = swap_forward(module, OUTER, plus_data, 1.0)
    assert torch.allclose(module(x), 2 * want + 1.0)
    with pytest.raises(RuntimeError, match="under another forward"):
        undo_inner()
    undo_outer()
    undo_inner()
    assert torch.equal(module(x), want) and "forward" not in module.__dict__


def test_the_same_key_twice_is_refused():
    module = _linear()
    swap_forward(module, KEY, doubled)
    with pytest.raises(ValueError, match="already has a forward swapped in as '_vlmtune_test'"):
        swap_forward(module, KEY, doubled)


def test_a_deep_copy_keeps_its_own_swap_on_its_own_weights():
    model = torch.nn.Sequential(_linear())
    swap_forward(model[0], KEY, doubled)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[0].weight.add_(1.0)
    x = torch.randn(2, 4)
    assert clone[0].forward.module is clone[0]
    assert swap_of(clone[0], KEY).inner.__self__ is clone[0]
    assert torch.allclose(clone(x), 2 * torch.nn.functional.linear(x, clone[0].weight, clone[0].bias))
    restore(model[0], KEY)
    assert swap_of(clone[0], KEY) is not None  # undoing the original leaves the copy's swap
    restore(clone[0], KEY)
    assert "forward" not in clone[0].__dict__


def test_a_swapped_model_pickles_and_its_state_dict_round_trips():
    model = torch.nn.Sequential(_linear())
    x = torch.randn(2, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swap_forward(model[0], KEY, doubled)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    restore(loaded[0], KEY)
    assert torch.equal(loaded(x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))
    assert pickle.loads(pickle.dumps(model))[0].forward.function is doubled
    fresh = _linear()
    fresh.load_state_dict(model[0].state_dict())
    assert torch.equal(fresh(x) * 2, model(x))


def test_a_swapped_forward_advertises_the_signature_it_replaced():
    module = torch.nn.Embedding(5, 2)
    before = inspect.signature(module.forward)
    swap_forward(module, KEY, doubled)
    assert inspect.signature(module.forward) == before


def _reads_global(x):
    return math_floor(x) + 1  # noqa: F821 (resolved from the copy's globals)


def test_with_global_gives_a_copy_its_own_global_and_leaves_the_module_alone():
    namespace = sys.modules[__name__].__dict__
    assert "math_floor" not in namespace
    copy_ = with_global(_reads_global, "math_floor", lambda x: 10 * x)
    assert copy_(2) == 21
    assert "math_floor" not in namespace  # nothing was written into the module
    with pytest.raises(ValueError, match="does not read the global 'nothing_here'"):
        with_global(_reads_global, "nothing_here", 0)


def _rotates(x):
    return x * 2


def _calls_rotates(x):
    return _rotates(x) + 1


def test_a_with_global_copy_compiles_with_its_own_global_not_the_modules():
    import functools

    import torch

    copy_ = with_global(_calls_rotates, "_rotates", functools.partial(torch.sub, other=5))
    assert "__name__" not in copy_.__globals__  # dynamo reads a named namespace as that module
    assert copy_.__module__ == __name__
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: copy_(x) * 3, backend="eager", fullgraph=True)
    x = torch.ones(3)
    torch.testing.assert_close(compiled(x), torch.full((3,), -9.0))
    torch.testing.assert_close(compiled(x + 1), torch.full((3,), -6.0))  # the guards still hold
    torch.testing.assert_close(_calls_rotates(x), torch.full((3,), 3.0))  # the module is untouched


def _decorated(function):
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs) * 100

    return wrapper


@_decorated
def _decorated_reader(x):
    return math_floor(x)  # noqa: F821


def test_with_global_copies_through_a_wraps_decorator():
    copy_ = with_global(_decorated_reader, "math_floor", lambda x: x + 1)
    assert copy_(2) == 300  # the decorator still runs around the copied inner function
    assert copy_.__wrapped__ is not _decorated_reader.__wrapped__
