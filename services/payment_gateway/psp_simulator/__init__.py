"""PSP simulator: a small HTTP server that speaks Authorize.Net's JSON API, for development and tests.

Start it with `python -m psp_simulator` (port 8090; `--port 0` picks a free port). Its first
line on stdout is `psp_simulator listening on http://<host>:<port>`. State lives in memory and
is lost when it stops.

The API
-------
`POST /xml/v1/request.api` answers the requests the payment gateway sends, in Authorize.Net's
wire format: a UTF-8 byte order mark, then JSON with amounts as numbers, errors inside an
HTTP 200 (`messages.resultCode` "Error"), and the members of `transactionRequest` checked
against the order of Authorize.Net's schema (E00003 otherwise).

- createTransactionRequest: authCaptureTransaction and authOnlyTransaction (paid with
  `payment.opaqueData` or `profile`), priorAuthCaptureTransaction (at most the authorized
  amount, once), voidTransaction (authorized or captured and not settled yet), and
  refundTransaction (settled captures only, `payment.creditCard.cardNumber` the last four
  digits of the card, refunds adding up to at most the amount settled);
- getTransactionDetailsRequest, getUnsettledTransactionListRequest, getSettledBatchListRequest
  and getTransactionListRequest.

Requests are authenticated with `merchantAuthentication` (E00007 otherwise). Each merchant has
an account of its own, opened the first time it signs in: login `simulator.<merchant>`,
transaction key `simulator-transaction-key` (the payment gateway's development default,
`SIMULATOR_ACCOUNT`, signs each merchant in so). Each account has its own books, and its own
webhook URL. Tests add accounts of their own.

Scripted outcomes
-----------------
A purchase or authorization is approved unless, first match wins:

1. a script queued with `POST /_simulator/script` matches it (see below);
2. its payment token (`opaqueData.dataValue`, or the payment profile id of `profile`) starts
   with `sim-<outcome>`, e.g. `sim-decline`, `sim-review-42`;
3. its amount is 9000.xx, the cents picking the outcome: .02 decline, .03 error, .04 review,
   .05 slow, .06 timeout, .07 server-error, .08 lost.

The outcomes:

- `approve`: approved (responseCode 1); an authorization awaits capture, a purchase awaits
  settlement;
- `decline`: declined (responseCode 2, reason 2), recorded with status `declined`;
- `error`: refused (responseCode 3, reason 19), nothing recorded;
- `review`: held for review (responseCode 4, reason 252), status `FDSAuthorizedPendingReview`
  until decided with `POST /_simulator/transactions/{transId}/review`;
- `slow`: approved after `--slow-seconds` (default 2);
- `timeout`: nothing recorded, and no answer for `--hang-seconds` (default 60);
- `server-error`: HTTP 503 with an HTML page, nothing recorded;
- `lost`: approved and recorded, then no answer for `--hang-seconds`: the charge happened but
  its answer never arrives.

Control endpoints
-----------------
- `POST /_simulator/script` {"outcome": "lost", "times": 1, "request": "createTransactionRequest",
  "transactionType": "refundTransaction", "invoiceNumber": "..."}: the next `times` requests
  matching the request name (default createTransactionRequest) and, when given, the
  transaction type and invoice number get `outcome`; for queries only `server-error`, `slow`
  and `timeout` apply.
- `PUT /_simulator/accounts/{login}` {"transactionKey", "signatureKey", "webhookUrl"}: adds or
  replaces an account; its notifications go to `webhookUrl` (none when null).
- `POST /_simulator/settle`: settles every captured transaction and refund into a new batch.
- `POST /_simulator/transactions/{transId}/review` {"decision": "approve" | "decline"}.
- `POST /_simulator/transactions/{transId}/chargeback` {"amount": "12.34", "disputeId": "..."}:
  a settled capture is charged back (status `chargeback`).
- `GET /_simulator/transactions?invoiceNumber=...`: the transactions recorded, as details.
- `GET /_simulator/notifications`: the notifications sent, with their delivery status.
- `POST /_simulator/notifications/{notificationId}/resend`: sends one again, byte for byte.

Webhooks
--------
The merchants' accounts send their notifications to `--webhook-url` (or
`$PSP_SIMULATOR_WEBHOOK_URL`; none when unset), `{merchant}` in it standing for the account's
merchant, as each merchant's own Authorize.Net account has its own webhook endpoint: under
`make run`, `http://127.0.0.1:8080/v1/webhooks/authorize-net/{merchant}`, the HTTP gateway's
route to the payment gateway.

Every change sends the account's webhook URL a notification signed like Authorize.Net's
(`X-ANET-Signature: sha512=<HEX>`, HMAC-SHA512 of the body keyed with the account's signature
key): net.authorize.payment.authcapture.created, authorization.created,
priorAuthCapture.created, void.created, refund.created, fraud.held, fraud.approved,
fraud.declined, and, not in Authorize.Net's catalogue, chargeback.created. Deliveries run in
the background, are tried 3 times, and may reach the receiver before the API's answer does.
"""
