"""Mitogen's linear strategy, found through ansible.cfg's strategy_plugins (the package is a dependency).

Mitogen keeps one Python interpreter per host alive for the whole run and sends modules to it over the
SSH connection, instead of starting Python and unpacking each module anew for every task.
"""

from __future__ import annotations

import ansible.plugins.strategy.linear
import ansible_mitogen.strategy


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, ansible.plugins.strategy.linear.StrategyModule):
    pass
