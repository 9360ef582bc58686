"""Running fedhet's clients outside the simulator: the wire codec and the Flower deployment."""
