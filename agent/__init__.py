"""AllDS agent: a HIAS iotJumpWay device that classifies blood-smear images over MQTT."""
