-- A keyed digest of a constant under FIELDLINE_DEVICE_TOKEN_KEY, written by the first start
-- with a key: a registry started with another key refuses to start rather than give every
-- device's broker account a password its device does not have.
CREATE TABLE registry.token_key_check (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    digest    text NOT NULL
);
