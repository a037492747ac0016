-- What a device's token is (DeviceTokenType enum number); 0 = an FCM registration token.
ALTER TABLE devices ADD COLUMN token_type smallint NOT NULL DEFAULT 0;
