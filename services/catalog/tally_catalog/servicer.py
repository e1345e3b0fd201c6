"""The CatalogService gRPC servicer.

Every method validates its request first (bad input never reaches a database), then
reads through the merchant directory or mutates through the unit of work, which brings
the merchant transaction, idempotency on `request_id` and the outbox. Refusals are raised
as `tally_kit.errors`; the server's error interceptor turns them into statuses.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from uuid import uuid4

import grpc
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import catalog_service_pb2_grpc, events_pb2
from tally_kit.db.directory import MerchantDirectory
from tally_kit.errors import NotFound
from tally_kit.uow import Mutations, Transaction

from tally_catalog import domain, events, mapping, store, validation
from tally_catalog.domain import Merchant

Clock = Callable[[], datetime]

SERVICE_NAME = api.DESCRIPTOR.services_by_name["CatalogService"].full_name


def utc_now() -> datetime:
    return datetime.now(UTC)


def _operation(method: str) -> str:
    """The full method name idempotency keys are bound to.

    For example `/tally.catalog.v1.CatalogService/CreateProduct`.
    """
    return f"/{SERVICE_NAME}/{method}"


class CatalogServicer(catalog_service_pb2_grpc.CatalogServiceServicer):
    def __init__(self, directory: MerchantDirectory, mutations: Mutations, *, clock: Clock = utc_now) -> None:
        self._directory = directory
        self._mutations = mutations
        self._clock = clock

    # --- merchants ----------------------------------------------------------------------------

    async def CreateMerchant(
        self, request: api.CreateMerchantRequest, context: grpc.aio.ServicerContext
    ) -> api.CreateMerchantResponse:
        command = validation.create_merchant(request)
        await self._directory.provision(command.merchant_id)

        async def effect(tx: Transaction) -> api.CreateMerchantResponse:
            now = self._clock()
            merchant = Merchant(
                merchant_id=command.merchant_id,
                config=command.config,
                config_revision=1,
                created_at=now,
                updated_at=now,
            )
            await store.insert_merchant(tx.conn, merchant)
            message = mapping.merchant(merchant)
            await tx.publish(events.MERCHANT_CREATED, events_pb2.MerchantCreated(merchant=message))
            return api.CreateMerchantResponse(merchant=message)

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("CreateMerchant"),
            request=request,
            response_type=api.CreateMerchantResponse,
            effect=effect,
        )

    async def GetMerchant(
        self, request: api.GetMerchantRequest, context: grpc.aio.ServicerContext
    ) -> api.GetMerchantResponse:
        merchant_id = validation.get_merchant(request)
        async with self._directory.connection(merchant_id) as conn:
            merchant = await store.get_merchant(conn, merchant_id)
        return api.GetMerchantResponse(merchant=mapping.merchant(merchant))

    async def UpdateMerchantConfig(
        self, request: api.UpdateMerchantConfigRequest, context: grpc.aio.ServicerContext
    ) -> api.UpdateMerchantConfigResponse:
        command = validation.update_merchant_config(request)

        async def effect(tx: Transaction) -> api.UpdateMerchantConfigResponse:
            current = await store.get_merchant(tx.conn, command.merchant_id, lock=True)
            updated = domain.reconfigure(current, command.changes, self._clock())
            message = mapping.merchant(updated)
            # A change to the same values is no change: no new revision, no event.
            if updated != current:
                await store.save_merchant_config(tx.conn, updated)
                await tx.publish(
                    events.MERCHANT_CONFIG_UPDATED, events_pb2.MerchantConfigUpdated(merchant=message)
                )
            return api.UpdateMerchantConfigResponse(merchant=message)

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("UpdateMerchantConfig"),
            request=request,
            response_type=api.UpdateMerchantConfigResponse,
            effect=effect,
        )

    # --- products -----------------------------------------------------------------------------

    async def CreateProduct(
        self, request: api.CreateProductRequest, context: grpc.aio.ServicerContext
    ) -> api.CreateProductResponse:
        command = validation.create_product(request)

        async def effect(tx: Transaction) -> api.CreateProductResponse:
            await store.get_merchant(tx.conn, command.merchant_id)
            product = domain.new_product(
                command.draft, product_id=uuid4(), merchant_id=command.merchant_id, now=self._clock()
            )
            await store.insert_product(tx.conn, product)
            message = mapping.product(product)
            await tx.publish(events.PRODUCT_CREATED, events_pb2.ProductCreated(product=message))
            return api.CreateProductResponse(product=message)

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("CreateProduct"),
            request=request,
            response_type=api.CreateProductResponse,
            effect=effect,
        )

    async def GetProduct(
        self, request: api.GetProductRequest, context: grpc.aio.ServicerContext
    ) -> api.GetProductResponse:
        ref = validation.get_product(request)
        async with self._directory.connection(ref.merchant_id) as conn:
            product = await store.get_product(conn, ref.merchant_id, ref.product_id)
        return api.GetProductResponse(product=mapping.product(product))

    async def ListProducts(
        self, request: api.ListProductsRequest, context: grpc.aio.ServicerContext
    ) -> api.ListProductsResponse:
        query = validation.list_products(request)
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.list_products(
                conn,
                query.merchant_id,
                query.page,
                distribution=query.distribution,
                grant_policy=query.grant_policy,
                show_archived=query.show_archived,
            )
        return api.ListProductsResponse(
            products=[mapping.product(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def ArchiveProduct(
        self, request: api.ArchiveProductRequest, context: grpc.aio.ServicerContext
    ) -> api.ArchiveProductResponse:
        ref = validation.archive_product(request)

        async def effect(tx: Transaction) -> api.ArchiveProductResponse:
            product = await store.get_product(tx.conn, ref.merchant_id, ref.product_id, lock=True)
            archived = domain.archive(product, self._clock())
            await store.save_archive(tx.conn, archived)
            message = mapping.product(archived)
            await tx.publish(events.PRODUCT_ARCHIVED, events_pb2.ProductArchived(product=message))
            return api.ArchiveProductResponse(product=message)

        return await self._mutations.run(
            ref.merchant_id,
            operation=_operation("ArchiveProduct"),
            request=request,
            response_type=api.ArchiveProductResponse,
            effect=effect,
        )

    # --- prices and offers --------------------------------------------------------------------

    async def ScheduleProductPrice(
        self, request: api.ScheduleProductPriceRequest, context: grpc.aio.ServicerContext
    ) -> api.ScheduleProductPriceResponse:
        command = validation.schedule_product_price(request)

        async def effect(tx: Transaction) -> api.ScheduleProductPriceResponse:
            # The product's row lock serialises schedulings of its prices and its archiving.
            product = await store.get_product(tx.conn, command.merchant_id, command.product_id, lock=True)
            now = self._clock()
            existing = await store.price_versions(
                tx.conn, command.merchant_id, command.product_id, command.amount.currency
            )
            change = domain.schedule_price(
                existing,
                price_id=uuid4(),
                product=product,
                amount=command.amount,
                effective_at=command.effective_at or now,
                now=now,
            )
            await store.save_price_change(tx.conn, change)
            response = api.ScheduleProductPriceResponse(price=mapping.product_price(change.price))
            event = events_pb2.ProductPriceScheduled(price=response.price)
            if change.superseded is not None:
                response.previous_price.CopyFrom(mapping.product_price(change.superseded))
                event.previous_price.CopyFrom(response.previous_price)
            await tx.publish(events.PRODUCT_PRICE_SCHEDULED, event)
            return response

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("ScheduleProductPrice"),
            request=request,
            response_type=api.ScheduleProductPriceResponse,
            effect=effect,
        )

    async def ListProductPrices(
        self, request: api.ListProductPricesRequest, context: grpc.aio.ServicerContext
    ) -> api.ListProductPricesResponse:
        query = validation.list_product_prices(request)
        async with self._directory.connection(query.merchant_id) as conn:
            await store.get_product(conn, query.merchant_id, query.product_id)
            page = await store.list_prices(
                conn, query.merchant_id, query.product_id, query.page, currency=query.currency
            )
        return api.ListProductPricesResponse(
            prices=[mapping.product_price(p) for p in page.items], next_page_token=page.next_page_token
        )

    async def GetOffer(
        self, request: api.GetOfferRequest, context: grpc.aio.ServicerContext
    ) -> api.GetOfferResponse:
        query = validation.get_offer(request)
        async with self._directory.connection(query.merchant_id) as conn:
            product = await store.get_product(conn, query.merchant_id, query.product_id)
            domain.ensure_sellable(product)
            currency = (
                query.currency or (await store.get_merchant(conn, query.merchant_id)).config.default_currency
            )
            prices = await store.price_versions(conn, query.merchant_id, query.product_id, currency)
        price = domain.price_in_effect(prices, currency, self._clock())
        if price is None:
            raise NotFound(
                f"product {query.product_id} has no price in effect in {currency}", reason="PRICE_NOT_FOUND"
            )
        return api.GetOfferResponse(offer=mapping.offer(domain.Offer(product=product, price=price)))

    async def ListOffers(
        self, request: api.ListOffersRequest, context: grpc.aio.ServicerContext
    ) -> api.ListOffersResponse:
        query = validation.list_offers(request)
        async with self._directory.connection(query.merchant_id) as conn:
            currency = (
                query.currency or (await store.get_merchant(conn, query.merchant_id)).config.default_currency
            )
            page = await store.list_offers(
                conn, query.merchant_id, query.page, currency=currency, at=self._clock()
            )
        return api.ListOffersResponse(
            offers=[mapping.offer(o) for o in page.items], next_page_token=page.next_page_token
        )

    # --- operation types ----------------------------------------------------------------------

    async def ScheduleOperationTypeVersion(
        self, request: api.ScheduleOperationTypeVersionRequest, context: grpc.aio.ServicerContext
    ) -> api.ScheduleOperationTypeVersionResponse:
        command = validation.schedule_operation_type_version(request)

        async def effect(tx: Transaction) -> api.ScheduleOperationTypeVersionResponse:
            await store.get_merchant(tx.conn, command.merchant_id)
            await store.lock_operation_code(tx.conn, command.merchant_id, command.operation_code)
            now = self._clock()
            existing = await store.operation_type_versions(
                tx.conn, command.merchant_id, command.operation_code
            )
            change = domain.schedule_operation_type_version(
                existing,
                merchant_id=command.merchant_id,
                operation_code=command.operation_code,
                resource_unit=command.resource_unit,
                credits_per_unit=command.credits_per_unit,
                effective_at=command.effective_at or now,
                now=now,
            )
            await store.save_operation_type_change(tx.conn, change)
            response = api.ScheduleOperationTypeVersionResponse(
                operation_type_version=mapping.operation_type_version(change.version)
            )
            event = events_pb2.OperationTypeVersionScheduled(
                operation_type_version=response.operation_type_version
            )
            if change.previous is not None:
                response.previous_version.CopyFrom(mapping.operation_type_version(change.previous))
                event.previous_version.CopyFrom(response.previous_version)
            await tx.publish(events.OPERATION_TYPE_VERSION_SCHEDULED, event)
            return response

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("ScheduleOperationTypeVersion"),
            request=request,
            response_type=api.ScheduleOperationTypeVersionResponse,
            effect=effect,
        )

    async def GetOperationTypeVersion(
        self, request: api.GetOperationTypeVersionRequest, context: grpc.aio.ServicerContext
    ) -> api.GetOperationTypeVersionResponse:
        ref = validation.get_operation_type_version(request)
        async with self._directory.connection(ref.merchant_id) as conn:
            version = await store.get_operation_type_version(
                conn, ref.merchant_id, ref.operation_code, ref.version
            )
        return api.GetOperationTypeVersionResponse(
            operation_type_version=mapping.operation_type_version(version)
        )

    async def GetActiveOperationTypeVersion(
        self, request: api.GetActiveOperationTypeVersionRequest, context: grpc.aio.ServicerContext
    ) -> api.GetActiveOperationTypeVersionResponse:
        query = validation.get_active_operation_type_version(request)
        async with self._directory.connection(query.merchant_id) as conn:
            versions = await store.operation_type_versions(conn, query.merchant_id, query.operation_code)
        if not versions:
            raise NotFound(
                f"operation type {query.operation_code} does not exist", reason="OPERATION_TYPE_NOT_FOUND"
            )
        instant = query.read_at or self._clock()
        active = domain.active_version(versions, instant)
        if active is None:
            raise NotFound(
                f"operation type {query.operation_code} has no version active at {instant.isoformat()}",
                reason="OPERATION_TYPE_NOT_ACTIVE",
            )
        return api.GetActiveOperationTypeVersionResponse(
            operation_type_version=mapping.operation_type_version(active)
        )

    async def ListOperationTypeVersions(
        self, request: api.ListOperationTypeVersionsRequest, context: grpc.aio.ServicerContext
    ) -> api.ListOperationTypeVersionsResponse:
        query = validation.list_operation_type_versions(request)
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.list_operation_type_versions(
                conn, query.merchant_id, query.page, operation_code=query.operation_code
            )
        return api.ListOperationTypeVersionsResponse(
            operation_type_versions=[mapping.operation_type_version(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    # --- subscription plans -------------------------------------------------------------------

    async def CreateSubscriptionPlan(
        self, request: api.CreateSubscriptionPlanRequest, context: grpc.aio.ServicerContext
    ) -> api.CreateSubscriptionPlanResponse:
        command = validation.create_subscription_plan(request)

        async def effect(tx: Transaction) -> api.CreateSubscriptionPlanResponse:
            await store.get_merchant(tx.conn, command.merchant_id)
            grant_product_id = command.draft.recurring_grant_product_id
            # Locked so that the product cannot be archived until the plan is in.
            grant_product = await store.find_product(
                tx.conn, command.merchant_id, grant_product_id, lock=True
            )
            domain.ensure_recurring_grant_product(grant_product, grant_product_id)
            plan = domain.new_plan(
                command.draft, plan_id=uuid4(), merchant_id=command.merchant_id, now=self._clock()
            )
            await store.insert_plan(tx.conn, plan)
            message = mapping.subscription_plan(plan)
            await tx.publish(
                events.SUBSCRIPTION_PLAN_CREATED,
                events_pb2.SubscriptionPlanCreated(subscription_plan=message),
            )
            return api.CreateSubscriptionPlanResponse(subscription_plan=message)

        return await self._mutations.run(
            command.merchant_id,
            operation=_operation("CreateSubscriptionPlan"),
            request=request,
            response_type=api.CreateSubscriptionPlanResponse,
            effect=effect,
        )

    async def GetSubscriptionPlan(
        self, request: api.GetSubscriptionPlanRequest, context: grpc.aio.ServicerContext
    ) -> api.GetSubscriptionPlanResponse:
        ref = validation.get_subscription_plan(request)
        async with self._directory.connection(ref.merchant_id) as conn:
            plan = await store.get_plan(conn, ref.merchant_id, ref.plan_id)
        return api.GetSubscriptionPlanResponse(subscription_plan=mapping.subscription_plan(plan))

    async def ListSubscriptionPlans(
        self, request: api.ListSubscriptionPlansRequest, context: grpc.aio.ServicerContext
    ) -> api.ListSubscriptionPlansResponse:
        query = validation.list_subscription_plans(request)
        async with self._directory.connection(query.merchant_id) as conn:
            page = await store.list_plans(conn, query.merchant_id, query.page)
        return api.ListSubscriptionPlansResponse(
            subscription_plans=[mapping.subscription_plan(p) for p in page.items],
            next_page_token=page.next_page_token,
        )
