"""FedAvg (McMahan et al. 2017): dense models, averaged weighted by number of examples.

It is the base `Method` as it is: every state entry that trains travels both ways, and the server
takes the example-weighted mean.
"""

from fedlora.methods.base import Method
from fedlora.methods.registry import register_method


@register_method("fedavg")
class FedAvg(Method):
    """Clients train the whole model; the server averages it."""
