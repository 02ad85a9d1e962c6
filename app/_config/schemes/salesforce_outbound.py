"""``salesforce-outbound``: Salesforce Outbound Messages (SOAP XML, not JSON).

Salesforce signs nothing: the check is that ``OrganizationId`` is the
configured ``organization_id`` (add TLS client certificates or an IP allow-list
at the proxy for more). One request holds up to 100 ``Notification`` elements,
each claimed on its own ``Id``. The answer Salesforce waits for is the SOAP
acknowledgement ``<Ack>true</Ack>``; if any notification's handler fails, the
answer is a SOAP fault with status 500 and Salesforce resends the message
(notifications already applied are then duplicates).

The payload handed to handlers, per notification::

    {"Id": "04l...", "OrganizationId": "00D...", "ActionId": "04k...",
     "EnterpriseUrl": "...", "PartnerUrl": "...",
     "sObject": {"type": "Contact", "Id": "003...", "Email": "..."}}

``SessionId`` is dropped on purpose: it is a live Salesforce session and would
otherwise be stored with every event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from idemhook._config.schemes.base import Delivery, Reply, Scheme, matches_any, register
from idemhook._values.errors import BadRequest, ConfigError, Unauthorized
from idemhook._values.outcome import Outcome

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND_NS = "http://soap.sforce.com/2005/09/outbound"
SOBJECT_NS = "urn:sobject.enterprise.soap.sforce.com"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
_ENVELOPE_FIELDS = ("OrganizationId", "ActionId", "EnterpriseUrl", "PartnerUrl")

XML = "text/xml; charset=utf-8"
ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Body>'
    f'<notificationsResponse xmlns="{OUTBOUND_NS}"><Ack>true</Ack></notificationsResponse>'
    "</soapenv:Body></soapenv:Envelope>"
).encode()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _value(element: Element) -> Any:
    if element.get(f"{{{XSI_NS}}}nil") == "true":
        return None
    children = list(element)
    if not children:
        return element.text or ""
    value: dict[str, Any] = {}
    kind = element.get(f"{{{XSI_NS}}}type")
    if kind:
        value["type"] = kind.rsplit(":", 1)[-1]
    for child in children:
        value[_local(child.tag)] = _value(child)
    return value


def parse_message(body: bytes) -> dict[str, Any]:
    """Parse an outbound message into ``{OrganizationId, ..., Notification: [...]}``."""
    try:
        root = fromstring(body, forbid_dtd=True)
    except (ParseError, DefusedXmlException) as exc:
        raise BadRequest(
            f"The body is not a SOAP outbound message: {type(exc).__name__}.",
            code="invalid_xml",
        ) from None
    notifications = root.find(f"{{{SOAP_NS}}}Body/{{{OUTBOUND_NS}}}notifications")
    if notifications is None:
        raise BadRequest(
            "The SOAP body holds no <notifications> element of Salesforce's outbound namespace.",
            code="invalid_xml",
        )
    message: dict[str, Any] = {}
    for name in _ENVELOPE_FIELDS:
        field = notifications.find(f"{{{OUTBOUND_NS}}}{name}")
        message[name] = field.text if field is not None else None
    items = []
    for element in notifications.findall(f"{{{OUTBOUND_NS}}}Notification"):
        item = {_local(child.tag): _value(child) for child in element}
        items.append({**item, **{k: message[k] for k in _ENVELOPE_FIELDS}})
    message["Notification"] = items
    return message


def envelope(
    organization_id: str,
    notifications: Sequence[Mapping[str, Any]],
    *,
    action_id: str = "04k000000000001AAA",
    sobject_type: str = "Contact",
) -> bytes:
    """Build an outbound message like Salesforce's (for tests, ``sign`` and ``send``).

    Each notification is ``{"Id": ..., "sObject": {field: value, ...}}``.
    """
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}" xmlns:xsi="{XSI_NS}">',
        f'<soapenv:Body><notifications xmlns="{OUTBOUND_NS}">',
        f"<OrganizationId>{escape(organization_id)}</OrganizationId>",
        f"<ActionId>{escape(action_id)}</ActionId>",
        '<SessionId xsi:nil="true"/>',
        "<EnterpriseUrl>https://example.my.salesforce.com/services/Soap/c/60.0</EnterpriseUrl>",
        "<PartnerUrl>https://example.my.salesforce.com/services/Soap/u/60.0</PartnerUrl>",
    ]
    for note in notifications:
        fields = "".join(
            f"<sf:{name}>{escape(str(value))}</sf:{name}>"
            for name, value in note.get("sObject", {}).items()
        )
        parts.append(
            f"<Notification><Id>{escape(str(note['Id']))}</Id>"
            f'<sObject xsi:type="sf:{sobject_type}" xmlns:sf="{SOBJECT_NS}">{fields}</sObject>'
            "</Notification>"
        )
    parts.append("</notifications></soapenv:Body></soapenv:Envelope>")
    return "".join(parts).encode("utf-8")


def soap_fault(message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Body><soapenv:Fault>'
        f"<faultcode>soapenv:Server</faultcode><faultstring>{escape(message)}</faultstring>"
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    ).encode()


@register("salesforce-outbound")
class SalesforceOutbound(Scheme):
    """Outbound Messages from the Salesforce org ``organization_id``."""

    needs_secret = False
    serves_tenants = False
    option_keys = frozenset({"organization_id"})
    defaults = {
        "event_id": "body:Id",
        "event_type": ["body:sObject.type", "body:ActionId"],
        "batch": "body:Notification",
        "max_batch": 100,
        "content_types": ["text/xml", "application/soap+xml"],
    }

    def __init__(self, source: str, config: Mapping[str, Any]) -> None:
        super().__init__(source, config)
        org = config.get("organization_id")
        if not isinstance(org, str) or len(org) not in (15, 18) or not org.isalnum():
            raise ConfigError(
                f"[sources.{source}] organization_id: required, the org's 15- or 18-character "
                "ID (Setup > Company Information > Salesforce.com Organization ID)"
            )
        self.organization_id = org

    def verify(self, delivery: Delivery, keys: Sequence[bytes] | None = None) -> int:
        given = parse_message(delivery.body)["OrganizationId"] or ""
        # Salesforce sends the 18-character ID; a configured 15-character one is its prefix.
        if not matches_any([self.organization_id], given[: len(self.organization_id)]):
            raise Unauthorized(
                "The message's OrganizationId is not this source's organization_id.",
                code="invalid_organization",
            )
        return 0

    def sign(self, delivery: Delivery) -> dict[str, str]:
        # Nothing is signed; Salesforce sends this header with every message.
        return {"SOAPAction": '""'}

    def parse(self, body: bytes) -> Any:
        return parse_message(body)

    def respond(self, outcomes: Sequence[Outcome]) -> Reply | None:
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            text = (
                f"{len(failed)} of {len(outcomes)} notifications failed "
                f"(first: {failed[0].event_id}); resend to retry them."
            )
            return Reply(500, soap_fault(text), XML)
        return Reply(200, ACK, XML)
