"""Communication graphs for decentralized methods: topologies, mixing weights, gossip.

Static graphs are drawn once on the host (:meth:`Topology.static`, with connectivity checks);
redrawn graphs come from the round key inside the jitted round (:meth:`Topology.draw`), with a
fixed number of edge slots. Gossip runs on the engine's chunked
:func:`~fedrnd.engine.edge_aggregate`.
"""

# community registers planted_partition in TOPOLOGIES when imported.
from fedrnd.graphs.community import community_of, community_sizes, place_groups
from fedrnd.graphs.graph import (
    MIXINGS,
    Graph,
    adjacency,
    check_mixing,
    components,
    consensus_distance,
    degrees,
    edge_chunk_for,
    gossip,
    is_connected,
    mixing_edges,
    mixing_matrix,
    num_edges,
    to_numpy_edges,
)
from fedrnd.graphs.topology import TOPOLOGIES, Topology, make_topology

__all__ = [
    "MIXINGS",
    "TOPOLOGIES",
    "Graph",
    "Topology",
    "adjacency",
    "check_mixing",
    "community_of",
    "community_sizes",
    "components",
    "consensus_distance",
    "degrees",
    "edge_chunk_for",
    "gossip",
    "is_connected",
    "make_topology",
    "mixing_edges",
    "mixing_matrix",
    "num_edges",
    "place_groups",
    "to_numpy_edges",
]
