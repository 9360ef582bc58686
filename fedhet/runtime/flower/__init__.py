"""fedhet on real devices through Flower: a generic ServerApp and ClientApp (``apps``), the
executor that runs fedhet's round loop over Flower's ``Grid`` (``server``), and what a SuperNode
holds (``node``: its client's data file and its persistent state)."""
