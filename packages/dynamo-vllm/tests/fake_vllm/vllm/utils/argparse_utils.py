"""`FlexibleArgumentParser` (vllm/utils/argparse_utils.py): accepts `deprecated=` on Python < 3.13."""

from __future__ import annotations

import sys
from argparse import Action, ArgumentParser, _ArgumentGroup
from typing import Any


class FlexibleArgumentParser(ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._deprecated: set[Action] = set()
        kwargs.pop("add_json_tip", None)
        super().__init__(*args, **kwargs)

    if sys.version_info < (3, 13):

        def add_argument(self, *args: Any, **kwargs: Any) -> Action:  # type: ignore[override]
            deprecated = kwargs.pop("deprecated", False)
            action = super().add_argument(*args, **kwargs)
            if deprecated:
                self._deprecated.add(action)
            return action

        class _FlexibleArgumentGroup(_ArgumentGroup):
            def __init__(self, container: Any, *args: Any, **kwargs: Any) -> None:
                super().__init__(container, *args, **kwargs)
                self._deprecated = container._deprecated

            def add_argument(self, *args: Any, **kwargs: Any) -> Action:  # type: ignore[override]
                deprecated = kwargs.pop("deprecated", False)
                action = super().add_argument(*args, **kwargs)
                if deprecated:
                    self._deprecated.add(action)
                return action

        def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            group = self._FlexibleArgumentGroup(self, *args, **kwargs)
            self._action_groups.append(group)
            return group
