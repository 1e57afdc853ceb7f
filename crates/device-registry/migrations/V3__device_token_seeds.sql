-- The seed a device token was derived from (with FIELDLINE_DEVICE_TOKEN_KEY), so the registry
-- can give a broker that lost its state every device's password again. NULL for tokens made
-- without a key (random, not derivable): such a device gets no broker account until its
-- token is rotated.
ALTER TABLE registry.devices ADD COLUMN token_seed bytea;
