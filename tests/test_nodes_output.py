"""`pimaster nodes`: what it shows of each node. Real master and agent processes on loopback."""

from __future__ import annotations

from harness import wait_for


def test_nodes_leaves_the_catalogue_out_unless_asked_and_then_gives_it_as_an_object(master, start_agent):
    start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")

    (node,) = master.json("nodes")["nodes"]
    assert node["id"] == "n1" and "catalog" not in node  # large, and not what `nodes` is for

    (node,) = master.json("nodes", "--catalog")["nodes"]
    catalog = node["catalog"]
    assert isinstance(catalog, dict), type(catalog)  # an object, not JSON inside a string
    assert "name" in catalog["file.managed"]["args"]
    assert "catalog" not in master.cli("nodes", "--catalog").stdout.lower()  # the table stays as it is
