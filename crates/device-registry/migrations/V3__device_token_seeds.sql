-- The seed a device token was derived from (with FIELDLINE_DEVICE_TOKEN_KEY), so the registry
-- can give a broker that lost its state every device's password again. NULL for tokens made
-- without a key (random, not derivable): such a device gets no broker account until its
-- token is rotated.
ALTER TABLE registry.devices ADD COLUMN token_seed bytea;

-- A keyed digest of a constant under FIELDLINE_DEVICE_TOKEN_KEY, written by the first start
-- with a key: a registry started with another key refuses to start rather than give every
-- device's broker account a password its device does not have.
CREATE TABLE registry.token_key_check (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    digest    text NOT NULL
);
